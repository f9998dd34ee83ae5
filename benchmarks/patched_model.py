"""What a user sees after ``resfuse.patch(model)``: a Hugging Face Llama (random weights),
unpatched and patched (``fuse_residual=True`` and ``"across_layers"``), on the same weights
and input.

Per variant: the training step's forward + backward time and the whole step with AdamW, the
bytes autograd saves for the backward (saved-tensor hooks), the peak memory of a step (CUDA
only) and how far the patched model's output and parameter gradients are from the unpatched
one's. The variants' timed steps are interleaved (one step of each in turn), so that a
machine whose speed drifts (a shared CPU, a GPU's clocks) slows them alike.

``make bench`` runs a tiny Llama on CPU (``CPU_TINY_LLAMA``, fp32: how CPU training runs);
the GPU campaign (tools/campaign/model.py) a Llama-3.2-1B slice in bf16.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .memory import SavedTensorLedger

VARIANTS = (("unpatched", None), ("patched", True), ("patched across_layers", "across_layers"))
# relative 2-norm error of the output and each parameter gradient against the unpatched model
# on the same weights: a few roundings of each op in bf16/fp16, summation order in fp32
TOLERANCE = {"bfloat16": 5e-2, "float16": 5e-2, "float32": 1e-4}


@dataclass(frozen=True)
class PatchedModelConfig:
    llama: dict  # transformers.LlamaConfig keywords
    batch: int
    seq: int
    dtype: str = "bfloat16"
    steps: int = 6  # timed steps per variant, after the warm-up ones
    warmup_steps: int = 2
    variants: tuple = field(default=VARIANTS)


# a tiny Llama that trains in seconds on a 2-core machine; its norms are a visible share of
# the step (hidden 512: the matmuls are small too), which is where a patch could slow it
CPU_TINY_LLAMA = PatchedModelConfig(
    llama=dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=512,
    ),
    batch=4,
    seq=256,
    dtype="float32",
    steps=20,  # the patch's gain is a few % of a step: enough steps for the median to see it
    warmup_steps=2,
)

# the harness end to end in a second (the tiny preset, the tests)
TINY_LLAMA = PatchedModelConfig(
    llama=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    ),
    batch=2,
    seq=16,
    dtype="float32",
    steps=2,
    warmup_steps=1,
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _timer(device: torch.device):
    """(mark, milliseconds between two marks) for the device."""
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


class _Variant:
    """One variant's model, optimizer and step."""

    def __init__(self, name, fuse, base, ids, grad):
        import resfuse

        self.name, self.ids, self.grad = name, ids, grad
        self.model = copy.deepcopy(base)
        self.row = {"variant": name, "fuse_residual": fuse}
        if fuse is not None:
            self.row["patch_report"] = str(resfuse.patch(self.model, fuse_residual=fuse))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.fb, self.steps = [], []

    def forward_backward(self) -> torch.Tensor:
        hidden = self.model(input_ids=self.ids).last_hidden_state
        hidden.backward(self.grad)
        return hidden

    def optimizer_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def first_step(self) -> dict:
        """The output and parameter gradients of a first forward + backward (no update)."""
        hidden = self.forward_backward()
        tensors = {"output": hidden.detach()}
        tensors.update(
            {
                f"grad {n}": p.grad.detach().clone()
                for n, p in self.model.named_parameters()
                if p.grad is not None
            }
        )
        self.opt.zero_grad(set_to_none=True)
        return tensors

    def saved_bytes(self) -> int:
        with SavedTensorLedger(ignore=self.model.parameters()) as ledger:
            hidden = self.model(input_ids=self.ids).last_hidden_state
        hidden.backward(self.grad)
        self.opt.zero_grad(set_to_none=True)
        return ledger.bytes


def compare(
    cfg: PatchedModelConfig,
    device: torch.device,
    *,
    out_of_time: Callable[[float], bool] = lambda reserve_s: False,
    progress: Optional[Callable[[str], None]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """The variants of ``cfg`` on ``device``: the record the report's "resfuse.patch on ..."
    section renders (``results["patched_models"]``). ``out_of_time(reserve_s)`` ends the
    timed steps early (a campaign's deadline); ``progress`` is called once per variant."""
    import transformers

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**cfg.llama)
    with torch.device(device):  # initialised where it runs: no CPU init of GPU weights
        base = transformers.LlamaModel(config).to(dtype=dtype).train()
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.seq), device=device, generator=g)
    grad = torch.randn(
        cfg.batch, cfg.seq, config.hidden_size, device=device, generator=g, dtype=torch.float32
    ).to(dtype)
    out = {
        "model": "transformers.LlamaModel",
        "transformers": transformers.__version__,
        "config": dict(cfg.llama),
        "batch": cfg.batch,
        "seq": cfg.seq,
        "dtype": cfg.dtype,
        "device": device.type,
        "params": sum(p.numel() for p in base.parameters()),
        "variants": [],
    }
    tolerance = TOLERANCE[cfg.dtype]
    variants, reference = [], None
    for name, fuse in cfg.variants:
        if out_of_time(10):
            out["variants"].append({"variant": name, "error": "not run: out of time"})
            continue
        v = _Variant(name, fuse, base, ids, grad)
        tensors = v.first_step()
        if reference is None:
            reference = tensors
        else:
            errors = {
                k: relative_error(tensors[k], reference[k]) for k in reference if k in tensors
            }
            worst = max(errors, key=errors.get)
            v.row.update(
                max_rel_err=errors[worst],
                worst=worst,
                agrees=errors[worst] <= tolerance and set(tensors) == set(reference),
                missing_grads=sorted(set(reference) - set(tensors))[:5],
            )
        del tensors
        v.row["saved_bytes"] = v.saved_bytes()
        for _ in range(cfg.warmup_steps):
            v.forward_backward()
            v.optimizer_step()
        variants.append(v)
        if progress is not None:
            progress(f"patched model: {name}")
    del reference

    mark, between = _timer(device)
    peaks: dict = {v.name: 0 for v in variants}
    for _ in range(cfg.steps):  # interleaved: one step of each variant in turn
        if out_of_time(5):
            break
        for v in variants:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            t0 = mark()
            v.forward_backward()
            t1 = mark()
            v.optimizer_step()
            t2 = mark()
            v.fb.append(between(t0, t1))
            v.steps.append(between(t0, t2))
            if device.type == "cuda":
                peaks[v.name] = max(peaks[v.name], torch.cuda.max_memory_allocated() - resident)

    for v in variants:
        row = v.row
        if device.type == "cuda":
            row["peak_step_bytes"] = peaks[v.name]
        step = statistics.median(v.steps) if v.steps else None
        row.update(
            fwd_bwd_ms=statistics.median(v.fb) if v.fb else None,
            step_ms=step,
            timed_steps=len(v.steps),
            tokens_per_s=cfg.batch * cfg.seq / (step / 1e3) if step else None,
        )
        out["variants"].append(row)
        if log is not None:
            log(
                f"  {v.name:<22} fwd+bwd {row['fwd_bwd_ms'] or 0:8.1f} ms  step "
                f"{row['step_ms'] or 0:8.1f} ms  saved {row['saved_bytes'] / 2**20:8.1f} MiB"
                + (
                    f"  peak {row['peak_step_bytes'] / 2**30:.2f} GiB"
                    if "peak_step_bytes" in row
                    else ""
                )
                + (f"  rel. err {row['max_rel_err']:.1e}" if "max_rel_err" in row else "")
            )
    # the variants the loop skipped keep their place in cfg.variants' order
    order = [name for name, _ in cfg.variants]
    out["variants"].sort(key=lambda r: order.index(r["variant"]))
    return out


def step_speedup(record: dict, variant: str = "patched") -> Optional[float]:
    """The unpatched step time over ``variant``'s (> 1: the patched model trains faster)."""
    by = {v["variant"]: v for v in record.get("variants", [])}
    base, other = by.get("unpatched", {}), by.get(variant, {})
    if base.get("step_ms") and other.get("step_ms"):
        return base["step_ms"] / other["step_ms"]
    return None
