"""TinySAM's hierarchical everything mode: a sparse round, then the dense grid where it is needed.

Round 1 prompts a coarse grid (a quarter of the points per side). The pixels where a kept mask's
logits exceed `high_confidence_thresh` (tau, 8.5) form the high-confidence area. Round 2 prompts
the dense grid, skipping every point inside that area: those objects are segmented already.
Both rounds' masks are merged, NMS-ed and post-processed as in dense mode.
"""

from typing import Any, Dict, List, Optional

import numpy as np

from ..modeling import Sam
from .amg import build_point_grid
from .generator import HighConfidenceArea, SamAutomaticMaskGenerator, _merge


class SamHierarchicalMaskGenerator(SamAutomaticMaskGenerator):
    def __init__(
        self,
        model: Sam,
        points_per_side: int = 32,
        round1_points_per_side: Optional[int] = None,
        high_confidence_thresh: float = 8.5,
        crop_n_points_downscale_factor: int = 1,
        **kwargs: Any,
    ) -> None:
        """`points_per_side` is the round-2 (dense) density; round 1 defaults to a quarter of it.
        Other arguments are the dense generator's."""
        super().__init__(model, points_per_side=points_per_side,
                         crop_n_points_downscale_factor=crop_n_points_downscale_factor, **kwargs)
        round1 = round1_points_per_side or max(1, points_per_side // 4)
        self.round1_grids = [
            build_point_grid(max(1, int(round1 / crop_n_points_downscale_factor ** i)))
            for i in range(self.crop_n_layers + 1)
        ]
        self.high_confidence_thresh = high_confidence_thresh

    def _process_crops(self, embeddings, input_sizes, crop_sizes, jobs, orig_sizes) -> List[Dict[str, Any]]:
        scales = [np.array(size)[None, ::-1] for size in crop_sizes]
        areas = [HighConfidenceArea(np.zeros(size, bool), self.high_confidence_thresh) for size in crop_sizes]
        round1 = [self.round1_grids[layer] * s for (_, _, layer), s in zip(jobs, scales)]
        first = self._decode_and_filter(embeddings, input_sizes, crop_sizes, jobs, orig_sizes, round1, high_conf=areas)

        dense = [self.point_grids[layer] * s for (_, _, layer), s in zip(jobs, scales)]
        round2 = [pts[~_inside(pts, a.area)] for pts, a in zip(dense, areas)]
        second = self._decode_and_filter(embeddings, input_sizes, crop_sizes, jobs, orig_sizes, round2)

        n_dense, n_kept = sum(len(p) for p in dense), sum(len(p) for p in round2)
        self.last_stats.update(
            round1_points=sum(len(p) for p in round1),
            round2_grid_points=n_dense,
            round2_points=n_kept,
            skipped_points=n_dense - n_kept,
        )
        return [self._crop_nms(_merge([a.cat(), b.cat()])) for a, b in zip(first, second)]


def _inside(points: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Which (x, y) pixel points fall inside a boolean area map."""
    h, w = area.shape
    xs = np.clip(points[:, 0].astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].astype(int), 0, h - 1)
    return area[ys, xs]
