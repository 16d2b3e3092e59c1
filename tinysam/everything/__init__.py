"""Everything mode: dense (SAM-compatible) and hierarchical automatic mask generation, and the
typed settings of both (`EverythingConfig`, torch-free: generators resolve on first use)."""

from ..utils.lazy import lazy_exports
from .config import MODES, EverythingConfig

__getattr__ = lazy_exports(
    __name__,
    {
        "SamAutomaticMaskGenerator": "generator",
        "SamHierarchicalMaskGenerator": "hierarchical",
    },
)

__all__ = ["MODES", "EverythingConfig", "SamAutomaticMaskGenerator", "SamHierarchicalMaskGenerator"]
