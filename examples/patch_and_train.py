"""Patch a model with resfuse and train it: one line, ``resfuse.patch(model)``.

Builds a small random-config model (no download), patches it, prints the report, and runs a
few training steps next to an unpatched copy, printing both losses::

    python examples/patch_and_train.py                       # Llama, fuse_residual=True
    python examples/patch_and_train.py --model vit --fuse-residual across_layers
    python examples/patch_and_train.py --device cuda --dtype bfloat16

On CPU resfuse runs its PyTorch reference backend; on a GPU, its kernels.
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import resfuse


def build(name: str) -> tuple[torch.nn.Module, callable]:
    """A small model and a function ``batch(generator) -> (inputs, targets)``."""
    if name == "vit":
        import timm

        model = timm.create_model(
            "vit_small_patch16_224",
            pretrained=False,
            img_size=64,
            init_values=1e-5,
            drop_path_rate=0.1,
            num_classes=10,
        )
        return model, lambda g, dev: (
            (torch.randn(8, 3, 64, 64, generator=g).to(dev),),
            torch.randint(0, 10, (8,), generator=g).to(dev),
        )
    import transformers

    config = transformers.AutoConfig.for_model(
        name,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)

    def batch(g, dev):
        ids = torch.randint(0, 512, (4, 64), generator=g).to(dev)
        return (ids,), ids

    return model, batch


def loss_of(model, inputs, targets) -> torch.Tensor:
    out = model(*inputs)
    if isinstance(out, torch.Tensor):  # timm: class logits
        return torch.nn.functional.cross_entropy(out.float(), targets)
    logits = out.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="llama",
        help="llama, mistral, qwen3, gemma2, gpt2, ... (a transformers model type) or vit (timm)",
    )
    parser.add_argument(
        "--fuse-residual", default="true", choices=["true", "false", "across_layers"]
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    fuse = {"true": True, "false": False}.get(args.fuse_residual, args.fuse_residual)

    torch.manual_seed(0)
    model, batch = build(args.model)
    model = model.to(args.device, getattr(torch, args.dtype)).train()
    reference = copy.deepcopy(model)

    report = resfuse.patch(model, fuse_residual=fuse)
    print(report)

    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (model, reference)]
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        inputs, targets = batch(gen, args.device)
        losses = []
        for m, opt in zip((model, reference), optimizers):
            torch.manual_seed(step)  # same dropout / drop-path draws in both models
            loss = loss_of(m, inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        print(f"step {step}: loss patched {losses[0]:.6f}  unpatched {losses[1]:.6f}")

    resfuse.unpatch(model)  # back to the original classes, same weights
    print(
        "unpatched:", all(type(a) is type(b) for a, b in zip(model.modules(), reference.modules()))
    )


if __name__ == "__main__":
    main()
