"""resfuse benchmarks: kernel bandwidth against the copy bandwidth, the reference
transformer's step time and activation memory, host overhead.

Run from a checkout as ``python -m benchmarks`` (``make bench``), or installed as
``resfuse-bench`` / ``python -m resfuse.benchmarks``; ``pytest benchmarks --benchmark-only``
is the pytest-benchmark suite (GPU only). Modules:

* ``traffic``: the minimal bytes per op (the GB/s denominators);
* ``timing``: CUDA-event / CPU timers and the copy bandwidth;
* ``implementations``: the baselines, resfuse's backends, peers found installed;
* ``kernels``: the kernel sweep; ``transformer``: the reference transformer;
* ``memory``: saved-tensor accounting; ``report`` / ``plots``: the writers; ``cli``: the CLI.
"""
