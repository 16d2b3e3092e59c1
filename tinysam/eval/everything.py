"""Everything-mode quality and time (the paper's Tables 2 and 5): for each ground-truth mask the
best IoU among the generated masks, averaged, and seconds per image."""

import time
from typing import Any, Dict, Sequence

import numpy as np

from ..everything.config import EverythingConfig
from ..utils.metrics import best_match_ious

__all__ = ["EverythingConfig", "everything_image"]


def everything_image(
    model, image: np.ndarray, gt_masks: Sequence[np.ndarray], configs: Sequence[EverythingConfig]
) -> Dict[str, Dict[str, Any]]:
    """{config name: {"ious": best IoU per ground-truth mask, "seconds", "masks"}} for one image."""
    out = {}
    for config in configs:
        generator = config.generator(model)
        start = time.perf_counter()
        records = generator.generate(image)
        seconds = time.perf_counter() - start
        ious = best_match_ious(list(gt_masks), [r["segmentation"] for r in records])
        out[config.name] = {
            "ious": ious.tolist(),
            "seconds": seconds,
            "masks": len(records),
            "skipped_points": generator.last_stats.get("skipped_points", 0),
        }
    return out
