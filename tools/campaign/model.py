"""Phase 5, the reference transformer: what a user sees after ``resfuse.patch(model)``.

A Llama slice from Hugging Face transformers (plan.GPU_MODEL: Llama-3.2-1B widths, 4 layers,
random weights, bf16), unpatched and patched with ``fuse_residual=True`` and
``"across_layers"``, on the same weights and input: forward + backward time, the optimizer
step (AdamW) apart, peak memory of a step, the bytes autograd saves for the backward
(saved-tensor hooks), and how far the patched model's output and gradients are from the
unpatched one's. Then, with the time left, benchmarks/transformer.py's own Llama-style stack
(eager-hf / eager-torch / fused) for the report's section."""

from __future__ import annotations

import copy
import statistics
import time

from . import common, plan

VARIANTS = (("unpatched", None), ("patched", True), ("patched across_layers", "across_layers"))
TOLERANCE = 5e-2  # relative 2-norm error, bf16 against bf16: a few roundings of each op


def _relative(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _timer(device):
    import torch

    if device.type == "cuda":

        def mark():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def between(a, b):
            b.synchronize()
            return a.elapsed_time(b)

        return mark, between
    return time.perf_counter, lambda a, b: (b - a) * 1e3


def llama_slice(ctx: common.Context) -> dict:
    import torch
    import transformers

    import resfuse
    from benchmarks.memory import SavedTensorLedger

    scale = plan.model_scale(ctx.rehearsal)
    device = torch.device(ctx.device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**scale.llama)
    with torch.device(device):  # initialised where it runs: no CPU init of the weights
        base = transformers.LlamaModel(config).to(dtype=dtype).train()
    batch, seq = scale.batch
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=g)
    grad = torch.randn(batch, seq, config.hidden_size, device=device, generator=g).to(dtype)
    params = sum(p.numel() for p in base.parameters())
    out = {
        "model": "transformers.LlamaModel",
        "transformers": transformers.__version__,
        "config": scale.llama,
        "batch": batch,
        "seq": seq,
        "dtype": "bfloat16",
        "params": params,
        "variants": [],
    }
    mark, between = _timer(device)
    reference = None
    for name, fuse in VARIANTS:
        if ctx.out_of_time(10):
            out["variants"].append({"variant": name, "error": "not run: out of time"})
            continue
        model = copy.deepcopy(base)
        row = {"variant": name, "fuse_residual": fuse}
        if fuse is not None:
            report = resfuse.patch(model, fuse_residual=fuse)
            row["patch_report"] = str(report)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def forward_backward(model=model):
            hidden = model(input_ids=ids).last_hidden_state
            hidden.backward(grad)
            return hidden

        hidden = forward_backward()  # the first step: what it computes, against unpatched
        tensors = {"output": hidden.detach()}
        tensors.update(
            {
                f"grad {n}": p.grad.detach()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )
        if reference is None:
            reference = tensors
        else:
            errors = {k: _relative(tensors[k], reference[k]) for k in reference if k in tensors}
            worst = max(errors, key=errors.get)
            row.update(
                max_rel_err=errors[worst],
                worst=worst,
                agrees=errors[worst] <= TOLERANCE,
                missing_grads=sorted(set(reference) - set(tensors))[:5],
            )
        opt.zero_grad(set_to_none=True)
        del hidden, tensors
        with SavedTensorLedger(ignore=model.parameters()) as ledger:
            hidden = model(input_ids=ids).last_hidden_state
        row["saved_bytes"] = ledger.bytes
        hidden.backward(grad)
        opt.zero_grad(set_to_none=True)
        del hidden
        for _ in range(scale.warmup_steps):
            forward_backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fb, steps = [], []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        for _ in range(scale.steps):
            if ctx.out_of_time(5):
                break
            t0 = mark()
            forward_backward()
            t1 = mark()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = mark()
            fb.append(between(t0, t1))
            steps.append(between(t0, t2))
        if device.type == "cuda":
            row["peak_step_bytes"] = torch.cuda.max_memory_allocated() - resident
        row.update(
            fwd_bwd_ms=statistics.median(fb) if fb else None,
            step_ms=statistics.median(steps) if steps else None,
            timed_steps=len(fb),
            tokens_per_s=batch * seq / (statistics.median(steps) / 1e3) if steps else None,
        )
        out["variants"].append(row)
        print(
            f"  {name:<22} fwd+bwd {row['fwd_bwd_ms'] or 0:8.1f} ms  step {row['step_ms'] or 0:8.1f} ms  "
            f"saved {row['saved_bytes'] / 2**20:8.1f} MiB"
            + (
                f"  peak {row['peak_step_bytes'] / 2**30:.2f} GiB"
                if "peak_step_bytes" in row
                else ""
            )
            + (f"  rel. err {row['max_rel_err']:.1e}" if "max_rel_err" in row else ""),
            flush=True,
        )
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def reference_stack(ctx: common.Context) -> dict:
    import torch

    from benchmarks import transformer

    scale = plan.model_scale(ctx.rehearsal)
    cfg = transformer.GPU_DEFAULT.with_(layers=scale.reference_layers, **(scale.reference or {}))
    return transformer.compare(cfg, torch.device(ctx.device), transformer.VARIANTS)


def _new_results(ctx: common.Context) -> dict:
    import torch

    from benchmarks import cli

    device = torch.device(ctx.device)
    results = cli.new_results(
        device, cli.device_info(device), "campaign", "python3 tools/gpu_campaign.py", []
    )
    results["copy"] = {"bytes_per_s": float("nan"), "buffer_bytes": 0, "median_ms": None}
    return results


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def run(ctx: common.Context) -> dict:
    from benchmarks import report

    record: dict = {}
    record["llama"] = llama_slice(ctx)
    ctx.write_record("model", {**record, "status": "partial", "summary": "running"})
    results_path = ctx.run_dir / report.JSON_NAME
    if not ctx.out_of_time(20):
        record["reference_stack"] = reference_stack(ctx)
    # into the benchmark report (a new one if the bandwidth phase left none)
    results = report.read_json(results_path) if results_path.exists() else _new_results(ctx)
    results["patched_models"] = [record["llama"]]
    if "reference_stack" in record:
        results["transformer"] = [record["reference_stack"]]
    report.write_json(results, results_path)
    by = {v["variant"]: v for v in record["llama"]["variants"]}
    base, fused = by.get("unpatched", {}), by.get("patched", {})
    wrong = [v["variant"] for v in record["llama"]["variants"] if v.get("agrees") is False]
    missing = [v["variant"] for v in record["llama"]["variants"] if v.get("step_ms") is None]
    record["status"] = common.status_of(
        len(wrong), bool(missing) or "reference_stack" not in record
    )
    parts = []
    if base.get("step_ms") and fused.get("step_ms"):
        parts.append(
            f"Llama slice step {base['step_ms']:.1f} ms unpatched vs {fused['step_ms']:.1f} "
            f"ms patched (x{base['step_ms'] / fused['step_ms']:.2f})"
        )
    if base.get("saved_bytes") and fused.get("saved_bytes"):
        parts.append(
            f"saved for backward {_mib(base['saved_bytes'])} -> {_mib(fused['saved_bytes'])}"
        )
    if base.get("peak_step_bytes") and fused.get("peak_step_bytes"):
        parts.append(
            f"peak {base['peak_step_bytes'] / 2**30:.2f} -> "
            f"{fused['peak_step_bytes'] / 2**30:.2f} GiB"
        )
    if wrong:
        parts.append(f"DISAGREES with unpatched: {wrong}")
    if missing:
        parts.append(f"not timed: {missing}")
    record["summary"] = "; ".join(parts) or "nothing measured"
    return record
