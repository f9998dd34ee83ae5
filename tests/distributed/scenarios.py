"""What each rank of the distributed tests runs (``world.World`` calls these by name).

Each scenario builds two identical tiny models on every rank (the same seed), patches one
with ``resfuse.patch``, puts both under the same engine, trains them side by side for a few
steps and returns, from every rank, how far the patched model is from the unpatched one
(the worst ``|a - e| / (rel * (|e| + max|e|) + floor)`` over the logits and over every
gradient, gathered whole from DTensor shards), how many fused calls ran, the patch report
and the warnings. The tests assert on that; nothing is asserted here.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.distributed as dist
from integrations.tiny_models import ARCHS, logits
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import resfuse
from resfuse.integrations import fused

REL, FLOOR = 1e-4, 1e-12


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = _full(actual).double(), _full(expected).double()
    if a.shape != e.shape:
        return float("inf")
    bound = REL * (e.abs() + e.abs().max()) + FLOOR
    return ((a - e).abs() / bound).max().item()


@contextlib.contextmanager
def _counting():
    """Counts the fused calls that carry a residual, i.e. the fused adds."""
    calls = {"adds": 0}
    originals = {name: getattr(fused, name) for name in ("add_norm", "norm_add", "norm_add_norm")}

    def counted(original):
        def counting(x, residual, *args, **kwargs):
            calls["adds"] += residual is not None
            return original(x, residual, *args, **kwargs)

        return counting

    for name, fn in originals.items():
        setattr(fused, name, counted(fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(fused, name, fn)


def _loss(out: torch.Tensor) -> torch.Tensor:
    # a loss that weighs every logit differently, so no gradient cancels by symmetry
    out = _full(out)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    return (out.float() * weights).sum()


def _train_side_by_side(model, reference, inputs, steps: int, step=None) -> dict:
    """``steps`` SGD steps of both models on ``inputs``; the worst errors of the logits and
    of every gradient over all steps, and the fused adds per step of the patched model."""
    worst = {"logits": 0.0, "grads": 0.0, "grads_compared": 0}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, reference)]
    adds = []
    for _ in range(steps):
        outs, grads = [], []
        for i, m in enumerate((model, reference)):
            m.zero_grad(set_to_none=True)
            with _counting() as calls:
                out = step(m, inputs) if step else logits(m, inputs)
                _loss(out).backward()
            if i == 0:
                adds.append(calls["adds"])
            outs.append(out.detach())
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        worst["logits"] = max(worst["logits"], _worst(*outs))
        assert grads[0].keys() == grads[1].keys(), "the two models' gradients differ in names"
        for name in grads[1]:
            err = _worst(grads[0][name], grads[1][name])
            if err > worst["grads"]:
                worst["grads"], worst["worst_grad"] = err, name
        worst["grads_compared"] = len(grads[1])
        for opt in optimizers:
            opt.step()
    worst["adds_per_step"] = adds
    return worst


def _two_models(arch: str, mode):
    spec = ARCHS[arch]
    model, reference = spec.model(), spec.model()  # one seed: the same weights
    report = resfuse.patch(model, fuse_residual=mode)
    return spec, model, reference, report


def _layers(model) -> nn.ModuleList:
    return model.model.layers


def _run(spec, model, reference, report, inputs, steps, step=None) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train_side_by_side(model, reference, inputs, steps, step)
    result["report"] = str(report)
    result["fused_in_report"] = len(report.fused)
    result["warnings"] = sorted({str(w.message) for w in caught if "resfuse" in str(w.message)})
    return result


# --------------------------------------------------------------------------- engines


def fsdp2(
    arch: str,
    mode,
    reshard_after_forward: bool = True,
    units: str = "layers",
    checkpointing=None,
    steps: int = 2,
) -> dict:
    """FSDP2: ``fully_shard`` per layer and on the root (``units="layers"``, as torchtitan and
    accelerate do) or on the root only; after ``checkpointing`` ("wrapper": torch's
    ``checkpoint_wrapper`` on every layer; "transformers": the model's own gradient
    checkpointing, non-reentrant). Each rank trains on its own batch."""
    from torch.distributed.fsdp import fully_shard

    spec, model, reference, report = _two_models(arch, mode)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in (model, reference):
        m.train()
        if checkpointing == "wrapper":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
                checkpoint_wrapper,
            )

            layer_cls = type(_layers(reference)[0])
            apply_activation_checkpointing(
                m,
                checkpoint_wrapper_fn=checkpoint_wrapper,
                check_fn=lambda module, cls=layer_cls: isinstance(module, cls),
            )
        elif checkpointing == "transformers":
            # transformers 5.24 names it activation_checkpointing_*, 5.17 gradient_*
            prefix = "activation" if hasattr(m, "activation_checkpointing_enable") else "gradient"
            getattr(m, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
        if units == "layers":
            for layer in _layers(m):
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward)
    inputs = spec.example(seed=1 + dist.get_rank())
    return _run(spec, model, reference, report, inputs, steps)


def fsdp2_patch_after_shard(arch: str, mode, steps: int = 2) -> dict:
    """``fully_shard`` first (per layer and root), then ``resfuse.patch``, train, then
    ``resfuse.unpatch``: the classes are FSDP2's over the model's own again, and the model
    computes what the unpatched one does."""
    from torch.distributed.fsdp import fully_shard

    spec = ARCHS[arch]
    model, reference = spec.model(), spec.model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in (model, reference):
        for layer in _layers(m):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    before = [type(m).__name__ for m in model.modules()]
    report = resfuse.patch(model, fuse_residual=mode)
    inputs = spec.example(seed=1 + dist.get_rank())
    result = _run(spec, model, reference, report, inputs, steps)
    resfuse.unpatch(model)
    result["classes_before_patch"] = before
    result["classes_after_unpatch"] = [type(m).__name__ for m in model.modules()]
    with torch.no_grad():
        result["unpatched_logits"] = _worst(logits(model, inputs), logits(reference, inputs))
    return result


def ddp(arch: str, mode, steps: int = 2) -> dict:
    """DistributedDataParallel around the patched model; each rank trains on its own batch."""
    spec, model, reference, report = _two_models(arch, mode)
    model = nn.parallel.DistributedDataParallel(model)
    reference = nn.parallel.DistributedDataParallel(reference)
    inputs = spec.example(seed=1 + dist.get_rank())
    return _run(spec, model, reference, report, inputs, steps)


def _tp_plan(norms: str) -> tuple[dict, dict]:
    """Tensor + sequence parallelism of a Llama decoder, torchtitan's layout: the residual
    stream sharded over the sequence (Shard(1)), attention and MLP column / row parallel.
    ``norms="sequence_parallel"``: ``SequenceParallel`` on every norm (its hooks make the
    input a Shard(1) DTensor); ``"replicated"``: the norms' parameters replicated, no hooks
    (the stream already is a Shard(1) DTensor), so resfuse fuses the adds on DTensors."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    norm_style = SequenceParallel() if norms == "sequence_parallel" else None
    layer = {
        "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        ),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    top = {
        "model.embed_tokens": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        ),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    if norm_style is not None:
        layer |= {"input_layernorm": norm_style, "post_attention_layernorm": norm_style}
        top |= {"model.norm": norm_style}
    return top, layer


def tensor_parallel(mode, norms: str = "sequence_parallel", steps: int = 2) -> dict:
    """A tiny Llama under DTensor tensor + sequence parallelism (``parallelize_module``);
    every rank takes the same batch, as tensor parallelism requires."""
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import parallelize_module

    spec, model, reference, report = _two_models("llama", mode)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    top, layer = _tp_plan(norms)
    for m in (model, reference):
        parallelize_module(m, mesh, top)
        for block in _layers(m):
            parallelize_module(block, mesh, layer)
        if norms == "replicated":
            for name, module in m.named_modules():
                if name.endswith("norm") or name.endswith("layernorm"):
                    distribute_module(module, mesh)  # parameters replicated, no hooks
    inputs = spec.example(seed=1)
    result = _run(spec, model, reference, report, inputs, steps)
    result["dtensor_params"] = sum(isinstance(p, DTensor) for p in model.parameters())
    return result


def dtensor_ops(norm: str, shard_dim: int, dtype: str = "float32") -> dict:
    """The functional API on DTensors sharded over ``shard_dim`` of (batch, seq, hidden), the
    parameters replicated, against the same call on the whole tensors: the worst error of
    y, h and every gradient, and the placements DTensor gave them."""
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    D = 24
    whole = {
        "x": torch.randn(3, 7, D, generator=gen),
        "residual": torch.randn(3, 7, D, generator=gen),
        "weight": 1 + 0.3 * torch.randn(D, generator=gen),
        "bias": 0.3 * torch.randn(D, generator=gen),
        "branch_scale": 0.5 + 0.1 * torch.randn(D, generator=gen),
    }
    whole = {k: v.to(dt) for k, v in whole.items()}
    rowscale = (torch.rand(3, 1, generator=gen) > 0.3).float() / 0.7
    if norm == "rms":
        whole.pop("bias")

    def call(t, rowscale):
        kw = dict(branch_scale=t["branch_scale"], rowscale=rowscale, residual_dtype=torch.float32)
        if norm == "rms":
            return resfuse.add_rms_norm(t["x"], t["residual"], t["weight"], **kw)
        return resfuse.add_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], **kw)

    leaves = {k: v.clone().requires_grad_() for k, v in whole.items()}
    y, h = call(leaves, rowscale)
    (y.float() * 1.5 + h.float() ** 2).sum().backward()

    placements = {k: [Shard(shard_dim)] if v.dim() > 1 else [Replicate()] for k, v in whole.items()}
    dleaves = {
        k: distribute_tensor(v.detach(), mesh, placements[k]).requires_grad_()
        for k, v in whole.items()
    }
    drowscale = DTensor.from_local(rowscale, mesh, [Replicate()], run_check=False)
    dy, dh = call(dleaves, drowscale)
    (dy.float() * 1.5 + dh.float() ** 2).sum().backward()
    out = {
        "y": _worst(dy, y),
        "h": _worst(dh, h),
        "y_placements": [str(p) for p in dy.placements],
        "h_placements": [str(p) for p in dh.placements],
    }
    for k in whole:
        out[f"d{k}"] = _worst(dleaves[k].grad, leaves[k].grad)
        out[f"d{k}_placements"] = [str(p) for p in dleaves[k].grad.placements]
    return out


def dtensor_errors() -> dict:
    """The messages of the calls resfuse refuses on DTensors."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x = torch.randn(2, 8, 16)
    w = torch.ones(16)

    def dt(t, *placements):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, mesh, list(placements))

    cases = {
        "hidden_sharded": lambda: resfuse.add_rms_norm(
            dt(x, Shard(2)), dt(x, Shard(2)), dt(w, Replicate())
        ),
        "weight_sharded": lambda: resfuse.rms_norm(dt(x, Shard(1)), dt(w, Shard(0))),
        "weight_plain": lambda: resfuse.rms_norm(dt(x, Shard(1)), w),
        "residual_plain": lambda: resfuse.add_rms_norm(dt(x, Shard(1)), x, dt(w, Replicate())),
        "x_plain": lambda: resfuse.rms_norm(x, dt(w, Replicate())),
    }
    out = {}
    for name, case in cases.items():
        try:
            case()
            out[name] = "no error"
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def modules_with_dtensor_parameters() -> dict:
    """resfuse's modules with their parameters distributed (replicated) and sequence-sharded
    inputs, against the same modules on whole tensors (AddNorm in training, with LayerScale
    and drop-path: every rank draws the same seed, so the masks agree)."""
    from torch.distributed.tensor import distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 16, generator=gen)
    residual = torch.randn(4, 9, 16, generator=gen)
    modules = {
        "RMSNorm": resfuse.RMSNorm(16),
        "LayerNorm": resfuse.LayerNorm(16),
        "AddNorm": resfuse.AddNorm(16, "layer", layer_scale_init=0.5, drop_path=0.5).train(),
        "NormAddNorm": resfuse.NormAddNorm(16, zero_centered_weight=True),
    }
    out = {}
    for name, plain in modules.items():
        with torch.no_grad():
            for p in plain.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        sharded = distribute_module(copy.deepcopy(plain), mesh)  # parameters replicated
        torch.manual_seed(11)
        y, h = plain(x, residual)
        (y * 2 + h).sum().backward()
        torch.manual_seed(11)
        dy, dh = sharded(
            distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(residual, mesh, [Shard(1)])
        )
        (dy * 2 + dh).sum().backward()
        errs = [_worst(dy, y), _worst(dh, h)]
        errs += [_worst(s.grad, p.grad) for s, p in zip(sharded.parameters(), plain.parameters())]
        out[name] = max(errs)
        out[name + "_param_types"] = sorted({type(p).__name__ for p in sharded.parameters()})
    return out


SCENARIOS = {
    f.__name__: f
    for f in (
        fsdp2,
        fsdp2_patch_after_shard,
        ddp,
        tensor_parallel,
        dtensor_ops,
        dtensor_errors,
        modules_with_dtensor_parameters,
    )
}
