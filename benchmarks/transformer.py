"""A reference transformer built from standard torch ops, run three ways on the same weights:

* ``eager-hf``: the residual add, then the norm as Hugging Face writes it
  (``implementations.hf_rms_norm`` / ``hf_layer_norm``: fp32 upcast by hand);
* ``eager-torch``: the residual add, then torch's ``F.rms_norm`` / ``F.layer_norm`` (what
  Hugging Face's GPT-2 and BERT do with ``nn.LayerNorm``);
* ``fused``: every residual add + norm through resfuse (``add_rms_norm`` /
  ``add_layer_norm``; ``rms_norm`` / ``layer_norm`` for the first pre-norm).

Styles:

* ``llama``: pre-norm decoder, RMSNorm, rotary embeddings, causal attention, SwiGLU MLP, no
  biases;
* ``gpt2``: pre-norm decoder, LayerNorm, causal attention, GELU (tanh) MLP, biases;
* ``bert``: post-norm encoder, LayerNorm, bidirectional attention, GELU MLP, biases.

The stack takes hidden states (the embedding's output) and returns the final normalised
hidden states. A pre-norm stack of L layers has 2L sublayers and 2L + 1 norms: norm i feeds
sublayer i, the last one is the final norm. Fused, each sublayer's output is added to the
stream and normalised for the next sublayer in one call::

    y = norm_0(x); h = x
    for i, sublayer in enumerate(sublayers):
        y, h = add_norm(sublayer(y), h, norm_{i+1})     # the last one: prenorm=False

A post-norm stack has one norm per sublayer: ``h = norm_i(h + sublayer_i(h))``.

``compare`` measures each variant: training step time (forward + backward), peak memory on
CUDA, the bytes autograd saves for the backward (``memory.SavedTensorLedger``: exact on any
device), and how far its output and every gradient are from ``eager-hf``'s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import resfuse

from .implementations import NORMS
from .memory import SavedTensorLedger
from .timing import TimerSettings, time_fn

STYLES = ("llama", "gpt2", "bert")
VARIANTS = ("eager-hf", "eager-torch", "fused")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Largest acceptable relative error (2-norm of the difference over the 2-norm of the
# reference tensor) of a variant's output and of each gradient against the fp32 reference:
# a few units of the dtype's rounding (2^-8 in bf16, 2^-11 in fp16), which every op adds.
AGREEMENT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class TransformerConfig:
    style: str = "llama"
    hidden: int = 2048
    layers: int = 8
    heads: int = 32
    ffn: int = 8192
    seq: int = 2048
    batch: int = 8
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(
                f"hidden ({self.hidden}) must split into {self.heads} heads of an even size"
            )

    @property
    def norm(self) -> str:
        return "rms" if self.style == "llama" else "layer"

    @property
    def prenorm(self) -> bool:
        return self.style != "bert"

    @property
    def n_norms(self) -> int:
        return 2 * self.layers + 1 if self.prenorm else 2 * self.layers

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def eps(self) -> float:
        return 1e-6 if self.norm == "rms" else 1e-5

    def with_(self, **changes) -> "TransformerConfig":
        return replace(self, **changes)


# About a 1B-parameter model's slice (Llama-3.2-1B widths, 8 of its 16 layers).
GPU_DEFAULT = TransformerConfig(hidden=2048, layers=8, heads=32, ffn=8192, seq=2048, batch=8)
CPU_DEFAULT = TransformerConfig(hidden=512, layers=4, heads=8, ffn=2048, seq=128, batch=4)


def expected_saving(cfg: TransformerConfig) -> int:
    """Bytes ``fused`` saves for the backward fewer than ``eager-hf``, from what the ops save.

    Per norm, Hugging Face's code keeps an fp32 copy of ``h`` (the centred copy for
    LayerNorm), the normalised value in the activation dtype (fp32 when that is fp32: both
    are 4 + e bytes per element with h itself) and the fp32 rstd per row; resfuse keeps ``h``
    (e bytes per element) and, for LayerNorm, the fp32 mean per row. The difference is 4
    bytes per element, plus 4 per row for RMSNorm, in every dtype.
    """
    per_row = 4 * cfg.hidden + (4 if cfg.norm == "rms" else 0)
    return cfg.n_norms * cfg.tokens * per_row


# --------------------------------------------------------------------------- the model


def _rope_tables(seq: int, head_dim: int, device, dtype, base: float = 10000.0):
    inv_freq = 1.0 / base ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(t):
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, **factory):
        super().__init__()
        bias = cfg.style != "llama"
        self.heads, self.causal = cfg.heads, cfg.style != "bert"
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=bias, **factory)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=bias, **factory)
        self.rope = cfg.style == "llama"
        if self.rope:
            cos, sin = _rope_tables(cfg.seq, cfg.hidden // cfg.heads, **factory)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, y):
        B, T, D = y.shape
        q, k, v = self.qkv(y).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            cos, sin = self.cos[:T], self.sin[:T]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, **factory):
        super().__init__()
        self.gated = cfg.style == "llama"
        bias = not self.gated
        self.up = nn.Linear(cfg.hidden, (2 if self.gated else 1) * cfg.ffn, bias=bias, **factory)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=bias, **factory)
        self.approximate = "tanh" if cfg.style == "gpt2" else "none"

    def forward(self, y):
        if self.gated:  # SwiGLU
            gate, up = self.up(y).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(y), approximate=self.approximate))


class ReferenceTransformer(nn.Module):
    """See the module docstring. ``forward(x, variant)``: ``x`` of shape (batch, seq, hidden)."""

    def __init__(self, cfg: TransformerConfig, device=None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": DTYPES[cfg.dtype]}
        self.sublayers = nn.ModuleList(
            (Attention if i % 2 == 0 else MLP)(cfg, **factory) for i in range(2 * cfg.layers)
        )
        Norm = resfuse.RMSNorm if cfg.norm == "rms" else resfuse.LayerNorm
        self.norms = nn.ModuleList(
            Norm(cfg.hidden, eps=cfg.eps, **factory) for _ in range(cfg.n_norms)
        )
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic, and not the identity for the norms: every weight and bias matters,
        so a variant that used the wrong norm's parameters could not agree with the others."""
        g = torch.Generator(device=self.norms[0].weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if name.startswith("norms.") and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.startswith("norms."):
                p.copy_(0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:  # residual branches scaled down with depth, as GPT-2 initialises them
                p.copy_(noise * 0.02 / math.sqrt(2 * self.cfg.layers))

    def forward(self, x, variant: str = "eager-hf", backend: str = "auto"):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "fused":
            return self._fused(x, backend)
        norm = NORMS[variant][self.cfg.norm]

        def normalize(h, i):
            return norm(h, self.norms[i].weight, self.norms[i].bias, self.norms[i].eps)

        h = x
        if not self.cfg.prenorm:
            for i, sublayer in enumerate(self.sublayers):
                h = normalize(h + sublayer(h), i)
            return h
        for i, sublayer in enumerate(self.sublayers):
            h = h + sublayer(normalize(h, i))
        return normalize(h, len(self.sublayers))

    def _add_norm(self, f, h, i, prenorm, backend):
        n = self.norms[i]
        if self.cfg.norm == "rms":
            return resfuse.add_rms_norm(f, h, n.weight, n.eps, prenorm=prenorm, backend=backend)
        return resfuse.add_layer_norm(
            f, h, n.weight, n.bias, n.eps, prenorm=prenorm, backend=backend
        )

    def _fused(self, x, backend):
        last = len(self.sublayers) - 1
        if not self.cfg.prenorm:
            h = x
            for i, sublayer in enumerate(self.sublayers):
                h = self._add_norm(sublayer(h), h, i, False, backend)
            return h
        n0 = self.norms[0]
        if self.cfg.norm == "rms":
            y = resfuse.rms_norm(x, n0.weight, n0.eps, backend=backend)
        else:
            y = resfuse.layer_norm(x, n0.weight, n0.bias, n0.eps, backend=backend)
        h = x
        for i, sublayer in enumerate(self.sublayers):
            if i == last:
                return self._add_norm(sublayer(y), h, i + 1, False, backend)
            y, h = self._add_norm(sublayer(y), h, i + 1, True, backend)


# --------------------------------------------------------------------------- measurement


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def _resolved_backend(backend: str, device: torch.device, cfg: "TransformerConfig") -> str:
    """The backend of the fused variant's add + norm calls (auto's pick for a training call)."""
    from resfuse import auto_table, backend_registry

    key = ("add_norm", cfg.norm == "rms", auto_table.DTYPES[cfg.dtype], cfg.hidden, True)
    return backend_registry.resolve(backend, device, key)


def _output_and_grads(
    model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, variant: str, backend: str
) -> dict:
    """One forward + backward: the output and every gradient, by name."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    out = model(x, variant, backend)
    out.backward(grad_out)
    tensors = {"output": out.detach(), "grad x": x.grad}
    tensors.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    x.grad = None
    return tensors


def fp32_reference(model: "ReferenceTransformer", x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """Output and gradients of ``eager-hf`` on an fp32 copy of the model (the same weights,
    upcast exactly) and of the input: the yardstick of every variant in a 16-bit dtype."""
    model32 = ReferenceTransformer(model.cfg.with_(dtype="float32"), device=x.device)
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for name, buf in model.named_buffers():  # rotary tables: the 16-bit values, upcast
        model32.get_buffer(name).copy_(buf.float())
    x32 = x.detach().float().requires_grad_()
    tensors = _output_and_grads(model32, x32, grad_out.float(), "eager-hf", "torch")
    del model32
    return tensors


def compare(
    cfg: TransformerConfig,
    device: torch.device,
    variants=VARIANTS,
    backend: str = "auto",
    settings: Optional[TimerSettings] = None,
    time_steps: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    seed: int = 0,
) -> dict:
    """Measure each variant on one model (shared weights) and one input. Returns
    ``{"config", "params", "expected_saving", "reference", "variants": [per variant]}``.

    Agreement: each variant's output and gradients against ``eager-hf`` run in fp32 on the
    same (upcast) weights, for 16-bit configs; for fp32 configs, against ``eager-hf``
    itself. The 16-bit variants differ from each other by rounding, so the fp32 run is
    what tells a rounding difference from a wrong result.
    """
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {VARIANTS}")
    settings = settings or TimerSettings(
        warmup_ms=0.0,
        rep_ms=0.0,
        cuda_min_calls=5,
        cpu_budget_s=1.0,
        cpu_min_calls=2,
        cpu_max_calls=5,
    )
    dtype = DTYPES[cfg.dtype]
    model = ReferenceTransformer(cfg, device=device, seed=seed)
    params = list(model.parameters())
    g = torch.Generator(device=device).manual_seed(seed + 1)
    shape = (cfg.batch, cfg.seq, cfg.hidden)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    x.requires_grad_()  # the embedding's output: it needs a gradient too
    grad_out = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    cuda = device.type == "cuda"

    if dtype == torch.float32:
        reference_name = "eager-hf"
        reference = _output_and_grads(model, x, grad_out, "eager-hf", backend)
    else:
        reference_name = "eager-hf in float32"
        reference = fp32_reference(model, x, grad_out)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x, variant, backend).backward(grad_out)

    rows = []
    for variant in variants:
        if cuda:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
        with SavedTensorLedger(ignore=params) as ledger:
            out = model(x, variant, backend)
        held = torch.cuda.memory_allocated() - resident if cuda else None
        del out
        tensors = _output_and_grads(model, x, grad_out, variant, backend)
        errors = {k: relative_error(tensors[k], reference[k]) for k in reference}
        del tensors
        worst = max(errors, key=errors.get)
        row = {
            "variant": variant,
            "backend": _resolved_backend(backend, device, cfg) if variant == "fused" else None,
            "saved_bytes": ledger.bytes,
            "saved_tensors": ledger.tensors,
            "saved_bytes_per_layer": ledger.bytes / cfg.layers,
            "allocated_after_forward_bytes": held,
            "max_rel_err": errors[worst],
            "worst": worst,
            "agrees": errors[worst] <= AGREEMENT_TOLERANCE[cfg.dtype],
            "peak_step_bytes": None,
        }
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_step_bytes"] = torch.cuda.max_memory_allocated() - resident
        if time_steps:
            row.update(
                {f"step_{k}": v for k, v in time_fn(step, device, settings).as_dict().items()}
            )
        model.zero_grad(set_to_none=True)
        x.grad = None
        rows.append(row)
        if progress:
            progress(f"transformer {cfg.style} {variant}")

    return {
        "config": asdict(cfg),
        "params": sum(p.numel() for p in params),
        "expected_saving": expected_saving(cfg),
        "reference": reference_name,
        "variants": rows,
    }
