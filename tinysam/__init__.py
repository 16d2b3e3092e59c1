"""TinySAM: efficient Segment Anything models (SAM ViT-H/L/B, TinyViT-5M) in pure PyTorch.

Drop-in for the official packages: `from tinysam import sam_model_registry, SamPredictor`.
Importing this package never imports Ray; the distributed pipelines live in `pipelines/`.
"""

import sys
import types
from typing import Any

from .utils.lazy import lazy_exports

# Names resolve on first use (PEP 562), so that `import tinysam.transforms` in a data-loading
# worker does not pay for torch, torchvision and the models.
_EXPORTS = {
    "MODEL_CONFIGS": "build_sam",
    "build_sam": "build_sam",
    "build_sam_vit_b": "build_sam",
    "build_sam_vit_h": "build_sam",
    "build_sam_vit_l": "build_sam",
    "build_sam_vit_t": "build_sam",
    "sam_model_registry": "build_sam",
    "EverythingConfig": "everything",
    "SamAutomaticMaskGenerator": "everything",
    "SamHierarchicalMaskGenerator": "everything",
    "SamPredictor": "predictor",
    "KNOWN_CHECKPOINTS": "weights",
    "CheckpointError": "weights",
    "load_checkpoint": "weights",
    "save_checkpoint": "weights",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """Keeps `tinysam.build_sam` the function, as in the official package, once the submodule of the
    same name is imported (the import system binds each submodule as an attribute of its package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "MODEL_CONFIGS",
    "KNOWN_CHECKPOINTS",
    "CheckpointError",
    "EverythingConfig",
    "SamAutomaticMaskGenerator",
    "SamHierarchicalMaskGenerator",
    "SamPredictor",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "load_checkpoint",
    "sam_model_registry",
    "save_checkpoint",
]
