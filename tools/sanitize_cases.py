"""Forward + backward of the cuda backend through every kernel path once, small enough for
compute-sanitizer (the GPU campaign's sanitize phase runs a few of them under memcheck and
racecheck; all four tools over all cases: see the README): D % 8 tails, misaligned operands,
several rows per block, one row per block, rows spanning thread-block clusters (sm_90: 9000
backward, 20000 both ways), streamed rows (on sm_90 only past what a cluster holds: 140000),
the persistent loop, the run-time dtype set; and the same for the sandwich layouts
(norm_add_norm / norm_add: the branch-norm kernels, the branch bias's shared-memory
accumulator, the three-pass streamed backward).

    python tools/sanitize_cases.py [--only NAME ...] [--device cuda] [--backend cuda]
    compute-sanitizer --tool memcheck --error-exitcode 7 python tools/sanitize_cases.py

``--device cpu --backend torch`` runs the same calls on the reference (the campaign's CPU
rehearsal: every case name and argument checked without a GPU).
"""

import argparse
import sys

import torch

import resfuse

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# name: (shape, x dtype, residual dtype, norm, misaligned, keywords)
CASES = {
    "tiny_layer": ((3, 1), F32, F32, "layer", False, {}),
    "small_scalar_scale": ((5, 7), BF16, BF16, "rms", False, dict(branch_scale=0.5)),
    "tail_misaligned": ((33, 1000), F16, F16, "layer", True, {}),
    "fp32_stream": ((4, 4097), BF16, F32, "rms", False, dict(zero_centered_weight=True)),
    "cluster_9000": ((2, 9000), BF16, BF16, "layer", False, {}),
    "cluster_20000_misaligned": ((2, 20000), F32, F32, "rms", True, {}),
    "streamed_140000": ((2, 140000), BF16, BF16, "layer", False, {}),
    "many_rows": ((3000, 130), BF16, BF16, "layer", False, dict(out_dtype=F32)),
    "mixed_dtypes": ((7, 3, 768), F16, BF16, "layer", False, dict(residual_dtype=F32)),
}

# name: (shape, x dtype, residual dtype, norm, misaligned, output norm, keywords)
SANDWICH_CASES = {
    "sandwich_tiny": ((3, 1), F32, F32, "layer", False, True, {}),
    "sandwich_small_zero_centered": (
        (5, 7),
        BF16,
        BF16,
        "rms",
        False,
        True,
        dict(zero_centered_weight=True),
    ),
    "sandwich_misaligned": ((33, 1000), F16, F16, "layer", True, True, {}),
    "norm_add_misaligned": ((33, 1000), BF16, BF16, "layer", True, False, {}),
    "sandwich_fp32_stream": ((4, 4097), BF16, F32, "rms", False, True, {}),
    "sandwich_cluster_9000": ((2, 9000), BF16, BF16, "layer", False, True, {}),
    "norm_add_cluster_9000": ((2, 9000), BF16, BF16, "layer", False, False, {}),
    "sandwich_cluster_20000_misaligned": ((2, 20000), F32, F32, "rms", True, True, {}),
    "sandwich_streamed_140000": ((2, 140000), BF16, BF16, "layer", False, True, {}),
    "sandwich_many_rows": ((3000, 130), BF16, BF16, "layer", False, True, dict(out_dtype=F32)),
    "sandwich_mixed_dtypes": (
        (7, 3, 768),
        F16,
        BF16,
        "layer",
        False,
        True,
        dict(residual_dtype=F32),
    ),
    "norm_add_mixed_dtypes": (
        (7, 3, 768),
        F16,
        BF16,
        "layer",
        False,
        False,
        dict(residual_dtype=F32),
    ),
}
NAMES = (*SANDWICH_CASES, *CASES)


def offset(t, elements=1):
    buf = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view


def _inputs(shape, xdt, rdt, misaligned, device):
    x = torch.randn(shape, device=device, dtype=xdt)
    r = torch.randn(shape, device=device, dtype=rdt)
    if misaligned:
        x, r = offset(x), offset(r)
    return x.requires_grad_(), r.requires_grad_()


def sandwich_case(name, device, backend):
    shape, xdt, rdt, norm, misaligned, output_norm, kw = SANDWICH_CASES[name]
    D = shape[-1]
    x, r = _inputs(shape, xdt, rdt, misaligned, device)

    def vector():
        return torch.randn(D, device=device, requires_grad=True)

    wb, bb = vector(), vector() if norm == "layer" else None
    common = dict(norm=norm, branch_bias=bb, backend=backend, **kw)
    if output_norm:
        y, h = resfuse.norm_add_norm(
            x, r, wb, vector(), bias=vector() if norm == "layer" else None, **common
        )
        torch.autograd.backward([y, h], [torch.randn_like(y), torch.randn_like(h)])
    else:
        h = resfuse.norm_add(x, r, wb, **common)
        torch.autograd.backward([h], [torch.randn_like(h)])


def add_norm_case(name, device, backend):
    shape, xdt, rdt, norm, misaligned, kw = CASES[name]
    D = shape[-1]
    x, r = _inputs(shape, xdt, rdt, misaligned, device)
    w = torch.randn(D, device=device, requires_grad=True)
    gamma = torch.randn(D, device=device, requires_grad=True)
    keep = (torch.rand(shape[0], *([1] * (len(shape) - 2)), device=device) > 0.3).float()
    common = dict(branch_scale=gamma, rowscale=keep, backend=backend)
    common.update(kw)
    if norm == "rms":
        y, h = resfuse.add_rms_norm(x, r, w, **common)
    else:
        b = torch.randn(D, device=device, requires_grad=True)
        y, h = resfuse.add_layer_norm(x, r, w, b, **common)
    torch.autograd.backward([y, h], [torch.randn_like(y), torch.randn_like(h)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"cases to run (default all): {', '.join(NAMES)}"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="cuda")
    args = ap.parse_args(argv)
    unknown = [n for n in args.only or () if n not in NAMES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(NAMES)}")
    torch.manual_seed(0)
    for name in args.only or NAMES:
        (sandwich_case if name in SANDWICH_CASES else add_norm_case)(
            name, args.device, args.backend
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"ok {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
