"""pytest-benchmark suite of the reference transformer's training step, eager vs fused
(``pytest benchmarks --benchmark-only``). ``extra_info`` carries the bytes saved for the
backward and the peak memory of the step."""

import pytest
import torch

from benchmarks import memory, transformer

# the GPU default's widths with fewer layers and tokens, to keep the suite short
CONFIG = transformer.GPU_DEFAULT.with_(layers=2, batch=4)


@pytest.mark.parametrize("variant", transformer.VARIANTS)
@pytest.mark.parametrize("style", transformer.STYLES)
def test_training_step(benchmark, style, variant):
    device = torch.device("cuda")
    cfg = CONFIG.with_(style=style)
    benchmark.group = f"transformer {style}"
    model = transformer.ReferenceTransformer(cfg, device=device)
    dtype = transformer.DTYPES[cfg.dtype]
    x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x, variant).backward(grad_out)
        torch.cuda.synchronize()

    with memory.SavedTensorLedger(ignore=model.parameters()) as ledger:
        model(x, variant)
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    benchmark.extra_info["saved_bytes"] = ledger.bytes
    benchmark.extra_info["peak_step_bytes"] = torch.cuda.max_memory_allocated() - resident
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
