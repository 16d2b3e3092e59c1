"""COCO polygons from masks, for the annotation tools that import polygons rather than RLE (CVAT,
Label Studio, Roboflow).

The rules (docs/design.md, "Polygons"):
- one polygon per outer contour: a mask in three pieces gives three;
- a COCO polygon has no holes, so each hole is joined to its outer contour by a zero-width cut
  (a "keyhole": the outline runs in along the cut, around the hole, and back out), which the
  even-odd fill of pycocotools (and of most tools) leaves empty; with `keep_holes=False` holes
  are filled instead (for tools that reject self-touching polygons);
- each contour is simplified with Douglas-Peucker (`cv2.approxPolyDP`) at `tolerance` pixels;
- pieces and holes under `min_area` pixels (by the contour's own area) are dropped, and so is
  any contour left with fewer than 3 points;
- OpenCV's contours run through the centres of the border pixels; each contour is moved half a
  pixel outwards (its holes half a pixel into the hole), to the pixels' outer edges, so that the
  polygon filled again (pycocotools) covers the border pixels the mask covers.
"""

from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np


@dataclass(frozen=True)
class PolygonRules:
    tolerance: float = 1.0  # px: Douglas-Peucker simplification
    min_area: float = 16.0  # px^2: smaller pieces and holes are dropped
    keep_holes: bool = True  # keyhole cuts; False: holes filled

    def __post_init__(self) -> None:
        if self.tolerance < 0 or self.min_area < 0:
            raise ValueError(f"polygon tolerance and minimum area must be >= 0, got {self}")


def mask_to_polygons(mask: np.ndarray, rules: PolygonRules = PolygonRules()) -> List[List[float]]:
    """COCO polygons ([x1, y1, x2, y2, ...] each) of a boolean mask, by `rules`; contours are found
    within the mask's bounding box only."""
    import cv2

    ys, xs = np.nonzero(mask)
    if not len(ys):
        return []
    top, left = int(ys.min()), int(xs.min())
    window = np.ascontiguousarray(mask[top : ys.max() + 1, left : xs.max() + 1], dtype=np.uint8)
    mode = cv2.RETR_CCOMP if rules.keep_holes else cv2.RETR_EXTERNAL  # CCOMP: outer contours and their holes
    contours, hierarchy = cv2.findContours(window, mode, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    parent = hierarchy[0][:, 3]
    kept = [_simplified(c, rules) for c in contours]
    polygons = []
    for k, outer in enumerate(kept):
        if parent[k] != -1 or outer is None:
            continue
        for hole in (kept[j] for j in np.flatnonzero(parent == k)):
            if hole is not None:
                outer = _keyhole(outer, hole)
        points = outer + (left, top)
        polygons.append([round(float(v), 2) for v in points.ravel()])
    return polygons


def _simplified(contour: np.ndarray, rules: PolygonRules):
    """The contour's points (N, 2) simplified, or None when it is too small or too thin to keep."""
    import cv2

    if len(contour) < 3 or cv2.contourArea(contour) < rules.min_area:
        return None
    simplified = cv2.approxPolyDP(contour, rules.tolerance, True) if rules.tolerance else contour
    if len(simplified) < 3:
        return None
    # pixel (x, y) spans [x, x + 1]: its centre is at + 0.5; then half a pixel away from the mask
    # (cv2 gives outer contours and holes opposite orientations: the same side of each edge)
    return _offset(simplified[:, 0, :].astype(np.float64) + 0.5, 0.5)


def _offset(points: np.ndarray, distance: float) -> np.ndarray:
    """The closed polygon moved `distance` to the right of its direction of travel (mitred
    corners, the miter capped at twice the distance)."""
    edges = np.roll(points, -1, axis=0) - points
    length = np.maximum(np.linalg.norm(edges, axis=1, keepdims=True), 1e-9)
    normals = np.stack([-edges[:, 1], edges[:, 0]], 1) / length  # right of travel in image coordinates
    before, after = np.roll(normals, 1, axis=0), normals
    miter = (before + after) / np.maximum(1 + (before * after).sum(1, keepdims=True), 0.25)
    return points + distance * miter


def _keyhole(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One outline for `outer` with `hole` cut out: from the outer vertex nearest the hole, in to
    that hole vertex, once around the hole, and back along the same cut."""
    d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmin(d), d.shape)
    around = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([outer[: i + 1], around, outer[i:]])


def rle_to_polygons(rle: Dict[str, Any], rules: PolygonRules = PolygonRules()) -> List[List[float]]:
    """`mask_to_polygons` of a COCO RLE."""
    from .rle import coco_rle_to_mask

    return mask_to_polygons(coco_rle_to_mask(rle), rules)
