"""resfuse benchmarks: kernel bandwidth, activation memory, host overhead."""
