"""resfuse: fused residual add + RMSNorm / LayerNorm kernels (CUDA C++ and Triton), forward
and backward, with drop-in modules. The contract is API.md; the semantics are
``resfuse.reference``."""

from .backend_registry import BackendUnavailableError, backends
from .functional import add_layer_norm, add_rms_norm, layer_norm, norm_add, norm_add_norm, rms_norm
from .integrations import PatchReport, patch, unpatch
from .modules import AddNorm, LayerNorm, NormAddNorm, RMSNorm

__version__ = "0.1.0"

__all__ = [
    "AddNorm",
    "BackendUnavailableError",
    "LayerNorm",
    "NormAddNorm",
    "PatchReport",
    "RMSNorm",
    "add_layer_norm",
    "add_rms_norm",
    "backends",
    "layer_norm",
    "norm_add",
    "norm_add_norm",
    "patch",
    "rms_norm",
    "unpatch",
]
