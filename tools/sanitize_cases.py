"""Forward + backward of the cuda backend through every kernel path once, small enough for
compute-sanitizer (tools/gpu_check.sh runs it under memcheck, racecheck, synccheck and
initcheck): D % 8 tails, misaligned operands, several rows per block, one row per block,
streamed rows (forward and backward), the persistent loop, the run-time dtype set."""

import torch

import resfuse


def offset(t, elements=1):
    buf = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view


CASES = [  # (shape, x dtype, residual dtype, norm, misaligned, keywords)
    ((3, 1), torch.float32, torch.float32, "layer", False, {}),
    ((5, 7), torch.bfloat16, torch.bfloat16, "rms", False, dict(branch_scale=0.5)),
    ((33, 1000), torch.float16, torch.float16, "layer", True, {}),
    ((4, 4097), torch.bfloat16, torch.float32, "rms", False, dict(zero_centered_weight=True)),
    ((2, 9000), torch.bfloat16, torch.bfloat16, "layer", False, {}),
    ((2, 20000), torch.float32, torch.float32, "rms", True, {}),
    ((3000, 130), torch.bfloat16, torch.bfloat16, "layer", False, dict(out_dtype=torch.float32)),
    ((7, 3, 768), torch.float16, torch.bfloat16, "layer", False, dict(residual_dtype=torch.float32)),
]


def main():
    torch.manual_seed(0)
    for shape, xdt, rdt, norm, misaligned, kw in CASES:
        D = shape[-1]
        x = torch.randn(shape, device="cuda", dtype=xdt)
        r = torch.randn(shape, device="cuda", dtype=rdt)
        if misaligned:
            x, r = offset(x), offset(r)
        x.requires_grad_()
        r.requires_grad_()
        w = torch.randn(D, device="cuda", requires_grad=True)
        gamma = torch.randn(D, device="cuda", requires_grad=True)
        keep = (torch.rand(shape[0], *([1] * (len(shape) - 2)), device="cuda") > 0.3).float()
        common = dict(branch_scale=gamma, rowscale=keep, backend="cuda")
        common.update(kw)
        if norm == "rms":
            y, h = resfuse.add_rms_norm(x, r, w, **common)
        else:
            b = torch.randn(D, device="cuda", requires_grad=True)
            y, h = resfuse.add_layer_norm(x, r, w, b, **common)
        torch.autograd.backward([y, h], [torch.randn_like(y), torch.randn_like(h)])
        torch.cuda.synchronize()
        print(f"ok {shape} {xdt} {rdt} {norm} misaligned={misaligned} {kw}", flush=True)


if __name__ == "__main__":
    main()
