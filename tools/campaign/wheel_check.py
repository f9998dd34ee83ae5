"""Run by the install phase in a clean interpreter (only the unpacked wheel on its path, run
from outside the source tree): the carried resfuse wheel, built here against torch 2.14.1,
loads on this machine's torch, registers its ops and, on a GPU, its kernels agree with the
reference forward and backward, for add + RMSNorm and the sandwich layout.

    python wheel_check.py PREFIX DEVICE      (prints one JSON line last)
"""

import json
import os
import sys


def main() -> int:
    prefix, device = sys.argv[1], sys.argv[2]
    import torch

    import resfuse
    from resfuse import cuda_ext

    where = os.path.realpath(resfuse.__file__)
    if not where.startswith(os.path.realpath(prefix)):
        raise SystemExit(f"resfuse imported from {where}, not from the wheel in {prefix}")
    reason = cuda_ext._load()
    out = {
        "resfuse": where,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build": cuda_ext.build_info(),
        "load_error": reason,
    }
    if reason:
        print(json.dumps(out))
        raise SystemExit(
            f"the wheel's extension does not load on torch {torch.__version__}: {reason}"
        )
    for op in ("cuda_add_norm_fwd", "cuda_add_norm_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse::{op}", "CUDA"), op
    out["backends"] = {n: [s.available, s.reason] for n, s in resfuse.backends().items()}
    if device == "cuda":
        if not resfuse.backends()["cuda"].available:
            raise SystemExit(f"cuda backend unavailable: {resfuse.backends()['cuda'].reason}")
        torch.manual_seed(0)
        x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn_like(x)
        w = torch.randn(4096, device="cuda", requires_grad=True)
        wb = torch.randn(4096, device="cuda", requires_grad=True)
        for name, call in (
            ("add_rms_norm", lambda b: resfuse.add_rms_norm(x, r, w, backend=b)),
            ("norm_add_norm", lambda b: resfuse.norm_add_norm(x, r, wb, w, backend=b)),
        ):
            got, want = call("cuda"), call("torch")
            for a, b in zip(got, want):
                torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
            leaves = (x, w) if name == "add_rms_norm" else (x, wb, w)
            g = torch.autograd.grad(got[0].float().sum() + got[1].float().sum(), leaves)
            g_ref = torch.autograd.grad(want[0].float().sum() + want[1].float().sum(), leaves)
            for a, b in zip(g, g_ref):
                torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=2e-2)
        torch.cuda.synchronize()
        out["kernels"] = "add_rms_norm and norm_add_norm agree with the reference, fwd + bwd"
    else:
        out["kernels"] = "not run: no GPU (the library loads and registers its ops)"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
