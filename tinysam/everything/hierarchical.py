"""TinySAM's hierarchical everything mode: a sparse round, then the dense grid where it is needed.

Round 1 prompts a coarse grid (a quarter of the points per side). The pixels where a kept mask's
logits exceed `high_confidence_thresh` (tau, 8.5) form the high-confidence area. Round 2 prompts
the dense grid, skipping every point inside that area: those objects are segmented already.
Both rounds' masks are merged, NMS-ed and post-processed as in dense mode.

Three refinements over the paper's description (measured in docs/benchmarks.md, "Everything
mode vs the official generator"; why, in docs/design.md, "Everything mode"):
- when the coarse grid divides the dense one, round 1 takes its points from the dense grid (the
  one nearest each coarse cell's centre), so no point is decoded twice and, with nothing skipped,
  the result is exactly the dense generator's;
- `skip_margin`: a point is skipped only when the high-confidence area covers the box of
  +-margin grid spacings around it, not just the point: a point near the edge of a confident
  mask is where a neighbouring object starts, or where a coarse point's mask is cut at the wrong
  place (crowded small objects lose masks without it). 0 is the paper's rule.
- `skip_similarity`: a covered point is skipped only where the image embedding is homogeneous:
  its cosine similarity to each of its 8 neighbouring embedding cells at least this. Small objects
  and parts inside a confident mask change the embedding, and the masks of the points on them
  are often the only ones to find them. The check costs one gather of the embedding. 0 is the
  paper's rule.
A lower tau skips more, but loses masks that neither check keeps, so the paper's 8.5 stays.
"""

from typing import Any, Dict, List, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..modeling import Sam
from .amg import build_point_grid
from .config import DEFAULTS
from .generator import HighConfidenceArea, SamAutomaticMaskGenerator, _merge


class SamHierarchicalMaskGenerator(SamAutomaticMaskGenerator):
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = DEFAULTS.points_per_side,
        round1_points_per_side: Optional[int] = DEFAULTS.round1_points_per_side,
        high_confidence_thresh: float = DEFAULTS.high_confidence_thresh,
        skip_margin: float = DEFAULTS.skip_margin,
        skip_similarity: float = DEFAULTS.skip_similarity,
        crop_n_points_downscale_factor: int = DEFAULTS.crop_n_points_downscale_factor,
        **kwargs: Any,
    ) -> None:
        """`points_per_side` is the round-2 (dense) density; round 1 defaults to a quarter of it.
        `skip_margin` (in dense grid spacings, >= 0) is the margin of high-confidence area a point
        needs around it to be skipped, `skip_similarity` (0-1) the least cosine similarity of the
        image embedding there to its neighbours'. Other arguments are the dense generator's."""
        super().__init__(
            model,
            points_per_side=points_per_side,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            **kwargs,
        )
        if round1_points_per_side is None:
            if points_per_side is None:
                raise ValueError("with explicit point_grids, give round1_points_per_side")
            round1_points_per_side = max(1, points_per_side // 4)
        if skip_margin < 0:
            raise ValueError(f"skip_margin must be >= 0, got {skip_margin}")
        if not 0 <= skip_similarity <= 1:
            raise ValueError(f"skip_similarity must be in [0, 1], got {skip_similarity}")
        self.round1_selections = [
            _coarse_selection(grid, max(1, int(round1_points_per_side / crop_n_points_downscale_factor**i)))
            for i, grid in enumerate(self.point_grids)
        ]
        self.high_confidence_thresh = high_confidence_thresh
        self.skip_margin = skip_margin
        self.skip_similarity = skip_similarity

    def _process_crops(self, embeddings, input_sizes, crop_sizes, jobs, orig_sizes) -> List[Dict[str, Any]]:
        scales = [np.array(size)[None, ::-1] for size in crop_sizes]
        areas = [HighConfidenceArea(np.zeros(size, bool), self.high_confidence_thresh) for size in crop_sizes]
        round1, candidates = [], []
        for (_, _, layer), s in zip(jobs, scales):
            coarse, rest = self.round1_selections[layer]
            round1.append(coarse * s)
            candidates.append(rest * s)
        first = self._decode_and_filter(embeddings, input_sizes, crop_sizes, jobs, orig_sizes, round1, high_conf=areas)

        round2 = []
        for k, (pts, area, size, (_, _, layer)) in enumerate(zip(candidates, areas, crop_sizes, jobs)):
            per_side = np.sqrt(len(self.point_grids[layer]))
            skip = _covered(pts, area.area, self.skip_margin * np.array(size[::-1]) / per_side)
            if self.skip_similarity > 0 and skip.any():
                cell = self.model.image_encoder.img_size / embeddings.shape[-1]  # pixels per embedding cell
                cells = self.transform.apply_coords(pts[skip], size) / cell
                skip[skip] = local_similarity(embeddings[k], cells) >= self.skip_similarity
            round2.append(pts[~skip])
        second = self._decode_and_filter(embeddings, input_sizes, crop_sizes, jobs, orig_sizes, round2)

        n_candidates, n_kept = sum(len(p) for p in candidates), sum(len(p) for p in round2)
        self.last_stats.update(
            round1_points=sum(len(p) for p in round1),
            round2_grid_points=n_candidates,
            round2_points=n_kept,
            skipped_points=n_candidates - n_kept,
        )
        return [self._crop_nms(_merge([a.cat(), b.cat()])) for a, b in zip(first, second)]


def _coarse_selection(grid: np.ndarray, n_coarse: int):
    """(round-1 points, round-2 candidates) in unit coordinates for a dense `grid`.

    A square n x n grid that n_coarse divides gives up the point nearest each coarse cell's centre
    (both rounds then partition the dense grid); any other grid keeps all its points for round 2
    and round 1 gets its own coarse grid.
    """
    n = int(round(np.sqrt(len(grid))))
    if n * n == len(grid) and np.allclose(grid, build_point_grid(n)) and n % n_coarse == 0:
        step = n // n_coarse
        picked = np.zeros((n, n), bool)
        picked[step // 2 :: step, step // 2 :: step] = True
        picked = picked.ravel()
        return grid[picked], grid[~picked]
    return build_point_grid(n_coarse), grid


def _covered(points: np.ndarray, area: np.ndarray, margin_xy: np.ndarray) -> np.ndarray:
    """Which (x, y) pixel points have `area` all over the box of +-margin_xy pixels around them."""
    h, w = area.shape
    rx, ry = (int(round(m)) for m in margin_xy)
    if rx or ry:
        area = cv2.erode(
            area.astype(np.uint8),
            np.ones((2 * ry + 1, 2 * rx + 1), np.uint8),
            borderType=cv2.BORDER_CONSTANT,
            borderValue=0,
        ).astype(bool)
    xs = np.clip(points[:, 0].astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].astype(int), 0, h - 1)
    return area[ys, xs]


def local_similarity(embedding: torch.Tensor, cells: np.ndarray) -> np.ndarray:
    """For (x, y) positions in embedding cells: the least cosine similarity between the (C, h, w)
    image embedding at that cell and at each of its 8 neighbours (edge cells repeat themselves)."""
    e = F.normalize(embedding.float(), dim=0)
    _, h, w = e.shape
    xy = torch.as_tensor(cells, dtype=torch.float32, device=e.device).floor().long()
    x, y = xy[:, 0].clamp(0, w - 1), xy[:, 1].clamp(0, h - 1)
    centre = e[:, y, x]
    least = torch.ones(len(cells), device=e.device)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx or dy:
                neighbour = e[:, (y + dy).clamp(0, h - 1), (x + dx).clamp(0, w - 1)]
                least = torch.minimum(least, (centre * neighbour).sum(0))
    return least.cpu().numpy()
