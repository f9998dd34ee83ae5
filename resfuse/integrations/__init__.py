"""Drop-in patching of existing models: ``resfuse.patch(model)`` / ``resfuse.unpatch(model)``
for Hugging Face transformers and timm (see patching.py; the classes it knows are in
architectures.py). Importing this package imports neither transformers nor timm."""

from .patching import PatchReport, patch, unpatch

__all__ = ["PatchReport", "patch", "unpatch"]
