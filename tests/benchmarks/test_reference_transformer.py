"""The reference transformer: its variants compute the same model, and the activation-memory
accounting is exact (fused saves fewer bytes, by the amount the ops' saved tensors predict)."""

import pytest
import torch

import resfuse
from benchmarks import memory, transformer

CPU = torch.device("cpu")
TINY = transformer.TransformerConfig(hidden=64, layers=2, heads=4, ffn=96, seq=12, batch=2)


def _run(model, x, grad_out, variant):
    model.zero_grad(set_to_none=True)
    x.grad = None
    out = model(x, variant)
    out.backward(grad_out)
    grads = {"x": x.grad.clone()} | {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("style", transformer.STYLES)
def test_variants_agree_in_fp32(style):
    cfg = TINY.with_(style=style, dtype="float32")
    model = transformer.ReferenceTransformer(cfg, device=CPU)
    x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, requires_grad=True)
    grad_out = torch.randn_like(x)
    out_ref, grads_ref = _run(model, x, grad_out, "eager-hf")
    assert len(grads_ref) == 1 + len(list(model.parameters()))
    for variant in ("eager-torch", "fused"):
        out, grads = _run(model, x, grad_out, variant)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_wrong_norm_parameter_is_noticed():
    # the norms' weights and biases are random, so chaining the wrong norm cannot agree
    cfg = TINY.with_(style="gpt2", dtype="float32")
    model = transformer.ReferenceTransformer(cfg, device=CPU)
    x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, requires_grad=True)
    out_ref, _ = _run(model, x, torch.ones_like(x), "eager-hf")
    with torch.no_grad():
        model.norms[1].weight, model.norms[2].weight = model.norms[2].weight, model.norms[1].weight
    out_swapped, _ = _run(model, x, torch.ones_like(x), "fused")
    assert not torch.allclose(out_swapped, out_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("style", transformer.STYLES)
def test_compare_saved_bytes_and_agreement(style, dtype):
    cfg = TINY.with_(style=style, dtype=dtype)
    result = transformer.compare(cfg, CPU, time_steps=False)
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == list(transformer.VARIANTS)
    saving = rows["eager-hf"]["saved_bytes"] - rows["fused"]["saved_bytes"]
    assert saving == transformer.expected_saving(cfg) > 0
    # exact, and spelled out: 4 bytes per element per norm (+ 4 per row for RMSNorm)
    per_norm = cfg.tokens * (4 * cfg.hidden + (4 if style == "llama" else 0))
    assert saving == (2 * cfg.layers + (style != "bert")) * per_norm
    assert result["reference"] == ("eager-hf" if dtype == "float32" else "eager-hf in float32")
    for row in rows.values():
        assert row["agrees"], row
        assert row["saved_bytes_per_layer"] == row["saved_bytes"] / cfg.layers
        assert row["peak_step_bytes"] is None  # CUDA only
    if dtype != "float32":  # resfuse rounds once: at least as close to fp32 as Hugging Face
        assert rows["fused"]["max_rel_err"] <= 1.5 * rows["eager-hf"]["max_rel_err"]


def test_compare_times_steps():
    result = transformer.compare(TINY, CPU, variants=["fused"], settings=None)
    row = result["variants"][0]
    # resfuse's CPU path: the compiled CPU kernels when this install has them
    assert row["backend"] == ("cpu" if resfuse.backends()["cpu"].available else "torch")
    assert 0 < row["step_q20_ms"] <= row["step_median_ms"] <= row["step_q80_ms"]


def test_ledger_counts_each_storage_once_and_ignores_parameters():
    w = torch.nn.Parameter(torch.randn(8))
    x = torch.randn(4, 8, requires_grad=True)
    with memory.SavedTensorLedger(ignore=[w]) as ledger:
        y = (x * x) * w  # x saved twice (one storage); w ignored; x * x saved by the mul
        z = y[:, :2].exp()  # exp saves its output: a new 4 x 2 tensor
    assert ledger.tensors == 3
    assert ledger.bytes == 4 * 8 * 4 + 4 * 8 * 4 + 4 * 2 * 4
    z.sum().backward()  # the hooks hand the tensors back unchanged
    assert x.grad is not None and x.grad.shape == x.shape


def test_config_validation():
    with pytest.raises(ValueError, match="style"):
        transformer.TransformerConfig(style="t5")
    with pytest.raises(ValueError, match="heads"):
        transformer.TransformerConfig(hidden=100, heads=3)
    with pytest.raises(ValueError, match="variant"):
        transformer.compare(TINY, CPU, variants=["compiled"])
    assert transformer.GPU_DEFAULT.n_norms == 17 and TINY.with_(style="bert").n_norms == 4
