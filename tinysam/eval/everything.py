"""Everything-mode quality and time (the paper's Tables 2 and 5): for each ground-truth mask the
best IoU among the generated masks, averaged, and seconds per image."""

import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
from ..utils.metrics import best_match_ious


@dataclass(frozen=True)
class EverythingConfig:
    """Dense mode, or hierarchical with (round-1 density, round-2 density, tau, skip margin)."""

    mode: str = "hierarchical"  # or "dense"
    points_per_side: int = 32  # round 2 (dense grid)
    round1_points_per_side: Optional[int] = None  # default points_per_side / 4
    high_confidence_thresh: float = 8.5
    skip_margin: float = 0.25  # in grid spacings; 0 is the paper's rule

    @property
    def name(self) -> str:
        if self.mode == "dense":
            return f"dense {self.points_per_side}"
        r1 = self.round1_points_per_side or max(1, self.points_per_side // 4)
        return (f"hierarchical {r1}/{self.points_per_side} tau {self.high_confidence_thresh:g} "
                f"margin {self.skip_margin:g}")

    @classmethod
    def parse(cls, spec: str) -> "EverythingConfig":
        """'dense:32' or 'hierarchical:8:32:8.5:0.25' (round 1, round 2, tau, skip margin)."""
        parts = spec.split(":")
        try:
            if parts[0] == "dense" and len(parts) <= 2:
                return cls("dense", int(parts[1]) if len(parts) > 1 else 32)
            if parts[0] == "hierarchical" and len(parts) <= 5:
                r1 = int(parts[1]) if len(parts) > 1 else None
                r2 = int(parts[2]) if len(parts) > 2 else 32
                tau = float(parts[3]) if len(parts) > 3 else 8.5
                margin = float(parts[4]) if len(parts) > 4 else 0.25
                return cls("hierarchical", r2, r1, tau, margin)
        except ValueError:
            pass
        raise ValueError(f"{spec!r}: expected dense[:POINTS] or hierarchical[:ROUND1[:ROUND2[:TAU[:MARGIN]]]]")

    def generator(self, model):
        if self.mode == "dense":
            return SamAutomaticMaskGenerator(model, points_per_side=self.points_per_side)
        return SamHierarchicalMaskGenerator(model, points_per_side=self.points_per_side,
                                            round1_points_per_side=self.round1_points_per_side,
                                            high_confidence_thresh=self.high_confidence_thresh,
                                            skip_margin=self.skip_margin)

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "name": self.name}


def everything_image(model, image: np.ndarray, gt_masks: Sequence[np.ndarray],
                     configs: Sequence[EverythingConfig]) -> Dict[str, Dict[str, Any]]:
    """{config name: {"ious": best IoU per ground-truth mask, "seconds", "masks"}} for one image."""
    out = {}
    for config in configs:
        generator = config.generator(model)
        start = time.perf_counter()
        records = generator.generate(image)
        seconds = time.perf_counter() - start
        ious = best_match_ious(list(gt_masks), [r["segmentation"] for r in records])
        out[config.name] = {"ious": ious.tolist(), "seconds": seconds, "masks": len(records),
                            "skipped_points": generator.last_stats.get("skipped_points", 0)}
    return out
