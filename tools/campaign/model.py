"""Phase 5, the reference transformer: what a user sees after ``resfuse.patch(model)``.

A Llama slice from Hugging Face transformers (plan.GPU_MODEL: Llama-3.2-1B widths, 4 layers,
random weights, bf16), unpatched and patched, by benchmarks/patched_model.py (the same
comparison ``make bench`` runs on a tiny Llama on CPU): forward + backward time, the optimizer
step (AdamW) apart, peak memory of a step, the bytes autograd saves for the backward
(saved-tensor hooks), and how far the patched model's output and gradients are from the
unpatched one's. Then, with the time left, benchmarks/transformer.py's own Llama-style stack
(eager-hf / eager-torch / fused) for the report's section."""

from __future__ import annotations

from . import common, plan


def llama_slice(ctx: common.Context) -> dict:
    import torch

    from benchmarks import patched_model

    scale = plan.model_scale(ctx.rehearsal)
    batch, seq = scale.batch
    cfg = patched_model.PatchedModelConfig(
        llama=scale.llama,
        batch=batch,
        seq=seq,
        dtype="bfloat16",
        steps=scale.steps,
        warmup_steps=scale.warmup_steps,
    )
    return patched_model.compare(
        cfg,
        torch.device(ctx.device),
        out_of_time=ctx.out_of_time,
        log=lambda s: print(s, flush=True),
    )


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
