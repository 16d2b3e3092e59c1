"""TinySAM: efficient Segment Anything models (SAM ViT-H/L/B, TinyViT-5M) in pure PyTorch.

Drop-in for the official packages: `from tinysam import sam_model_registry, SamPredictor`.
Importing this package never imports Ray; the distributed pipelines live in `pipelines/`.
"""

from .build_sam import (
    MODEL_CONFIGS,
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_t,
    sam_model_registry,
)
from .everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
from .predictor import SamPredictor
from .weights import KNOWN_CHECKPOINTS, CheckpointError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "MODEL_CONFIGS",
    "KNOWN_CHECKPOINTS",
    "CheckpointError",
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
