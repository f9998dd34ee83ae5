"""Forward + backward of the cuda backend through every kernel path once, small enough for
compute-sanitizer (tools/gpu_check.sh runs it under memcheck, racecheck, synccheck and
initcheck): D % 8 tails, misaligned operands, several rows per block, one row per block,
rows spanning thread-block clusters (sm_90: 9000 and 20000), streamed rows (forward and
backward; on sm_90 only past what a cluster holds: 140000), the persistent loop, the run-time
dtype set; and the
same for the sandwich layouts (norm_add_norm / norm_add: the branch-norm kernels, the branch
bias's shared-memory accumulator, the three-pass streamed backward)."""

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
    ((2, 140000), torch.bfloat16, torch.bfloat16, "layer", False, {}),
    ((3000, 130), torch.bfloat16, torch.bfloat16, "layer", False, dict(out_dtype=torch.float32)),
    ((7, 3, 768), torch.float16, torch.bfloat16, "layer", False, dict(residual_dtype=torch.float32)),
]


# (shape, x dtype, residual dtype, norm, misaligned, output norm, keywords)
SANDWICH_CASES = [
    ((3, 1), torch.float32, torch.float32, "layer", False, True, {}),
    ((5, 7), torch.bfloat16, torch.bfloat16, "rms", False, True, dict(zero_centered_weight=True)),
    ((33, 1000), torch.float16, torch.float16, "layer", True, True, {}),
    ((33, 1000), torch.bfloat16, torch.bfloat16, "layer", True, False, {}),
    ((4, 4097), torch.bfloat16, torch.float32, "rms", False, True, {}),
    ((2, 9000), torch.bfloat16, torch.bfloat16, "layer", False, True, {}),
    ((2, 9000), torch.bfloat16, torch.bfloat16, "layer", False, False, {}),
    ((2, 20000), torch.float32, torch.float32, "rms", True, True, {}),
    ((2, 140000), torch.bfloat16, torch.bfloat16, "layer", False, True, {}),
    ((3000, 130), torch.bfloat16, torch.bfloat16, "layer", False, True, dict(out_dtype=torch.float32)),
    ((7, 3, 768), torch.float16, torch.bfloat16, "layer", False, True, dict(residual_dtype=torch.float32)),
    ((7, 3, 768), torch.float16, torch.bfloat16, "layer", False, False, dict(residual_dtype=torch.float32)),
]


def sandwich_main():
    for shape, xdt, rdt, norm, misaligned, output_norm, kw in SANDWICH_CASES:
        D = shape[-1]
        x = torch.randn(shape, device="cuda", dtype=xdt)
        r = torch.randn(shape, device="cuda", dtype=rdt)
        if misaligned:
            x, r = offset(x), offset(r)
        x.requires_grad_()
        r.requires_grad_()

        def vector():
            return torch.randn(D, device="cuda", requires_grad=True)

        wb, bb = vector(), vector() if norm == "layer" else None
        common = dict(norm=norm, branch_bias=bb, backend="cuda", **kw)
        if output_norm:
            y, h = resfuse.norm_add_norm(x, r, wb, vector(), bias=vector() if norm == "layer" else None,
                                         **common)
            torch.autograd.backward([y, h], [torch.randn_like(y), torch.randn_like(h)])
        else:
            h = resfuse.norm_add(x, r, wb, **common)
            torch.autograd.backward([h], [torch.randn_like(h)])
        torch.cuda.synchronize()
        print(f"ok {'norm_add_norm' if output_norm else 'norm_add'} {shape} {xdt} {rdt} {norm} "
              f"misaligned={misaligned} {kw}", flush=True)


def main():
    torch.manual_seed(0)
    sandwich_main()
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
