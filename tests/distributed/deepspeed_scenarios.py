"""DeepSpeed ZeRO-3 on the world's ranks (CPU accelerator, gloo; ``DS_ACCELERATOR=cpu`` is
set before deepspeed is imported): the patched and the unpatched tiny model, each in its own
engine, trained side by side. Parameters are partitioned across the ranks and gathered by
ZeRO-3's hooks around each module's own call."""

from __future__ import annotations

import importlib
import warnings

import torch
import torch.distributed as dist
from distributed.scenarios import _counting, _loss, _worst
from integrations.tiny_models import ARCHS, logits

import resfuse

_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    # every parameter partitioned (the default keeps small ones whole): the norms too
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def _engine(model):
    import deepspeed

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(_CONFIG))
    return engine


def zero3(arch: str, mode, partitioned_at_build: bool = False, steps: int = 2) -> dict:
    """``partitioned_at_build``: the models are built under ``deepspeed.zero.Init`` (as
    transformers does under ZeRO-3), so their parameters are partitioned when resfuse.patch
    sees them; else they are partitioned by ``deepspeed.initialize`` after patching."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    # (deepspeed.comm's attribute `torch` is torch itself: the module comes from importlib)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    # DeepSpeed compiles a shared-memory all-reduce for inference on its first init (about
    # 30 s of g++ on this machine); training on gloo never calls it
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")  # joins the world's process group
    spec = ARCHS[arch]
    if partitioned_at_build:
        # transformers builds under zero.Init (and initializes the partitioned weights) while
        # an HfDeepSpeedConfig with stage 3 is alive
        from transformers.integrations import HfDeepSpeedConfig

        hf_config = HfDeepSpeedConfig(dict(_CONFIG))  # noqa: F841 - kept alive on purpose
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(spec.build())
        model, reference = models
    else:
        model, reference = spec.model(), spec.model()
    report = resfuse.patch(model, fuse_residual=mode)
    engines = [_engine(m) for m in (model, reference)]
    inputs = spec.example(seed=1 + dist.get_rank())
    worst = {"logits": 0.0, "grads": 0.0, "adds_per_step": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            outs, grads = [], []
            for i, engine in enumerate(engines):
                with _counting() as calls:
                    out = logits(engine, inputs)
                    engine.backward(_loss(out))
                if i == 0:
                    worst["adds_per_step"].append(calls["adds"])
                outs.append(out.detach())
                grads.append(
                    {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
                )
                engine.step()
            worst["logits"] = max(worst["logits"], _worst(*outs))
            for name in grads[1]:
                err = _worst(grads[0][name], grads[1][name])
            if err > worst["grads"]:
                worst["grads"], worst["worst_grad"] = err, name
            worst["grads_compared"] = len(grads[1])
    worst["report"] = str(report)
    worst["warnings"] = sorted({str(w.message) for w in caught if "resfuse" in str(w.message)})
    return worst


SCENARIOS = {"zero3": zero3}
