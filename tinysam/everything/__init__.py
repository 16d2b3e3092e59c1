"""Everything mode: dense (SAM-compatible) and hierarchical automatic mask generation."""

from .generator import SamAutomaticMaskGenerator
from .hierarchical import SamHierarchicalMaskGenerator

__all__ = ["SamAutomaticMaskGenerator", "SamHierarchicalMaskGenerator"]
