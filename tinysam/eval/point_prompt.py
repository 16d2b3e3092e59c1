"""SAM's interactive point protocol (the paper's Figure 4).

The first point is the interior point farthest from the mask boundary (maximum of the distance
transform). Each next point is the farthest point of the larger error region: positive inside a
false negative, negative inside a false positive. The first prediction is multimask (highest
predicted IoU kept); later ones are single-mask and get the previous low-res logits as mask
input, as in SAM's interactive evaluation. mIoU is reported after 1, 2, 3, 5 and 9 points.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..predictor import SamPredictor

DEFAULT_POINTS = (1, 2, 3, 5, 9)


def _farthest(region: np.ndarray) -> Tuple[Tuple[int, int], float]:
    """((x, y), distance) of the region's pixel farthest from its boundary (image borders count
    as boundary); ties go to the first in raster order."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (int(x), int(y)), float(dist[y, x])


def first_point(gt: np.ndarray) -> Tuple[int, int]:
    """(x, y) of the first click: the interior point farthest from the ground truth's boundary."""
    if not gt.any():
        raise ValueError("empty ground-truth mask")
    return _farthest(gt)[0]


def next_point(gt: np.ndarray, pred: np.ndarray) -> Optional[Tuple[Tuple[int, int], int]]:
    """((x, y), label) of the next click, or None when the prediction is exact."""
    fn, fp = gt & ~pred, pred & ~gt
    if not fn.any() and not fp.any():
        return None
    (p_fn, d_fn) = _farthest(fn) if fn.any() else ((0, 0), -1.0)
    (p_fp, d_fp) = _farthest(fp) if fp.any() else ((0, 0), -1.0)
    return (p_fn, 1) if d_fn >= d_fp else (p_fp, 0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def point_prompt_image(
    predictor: SamPredictor, gt_masks: Sequence[np.ndarray], n_points: Sequence[int] = DEFAULT_POINTS
) -> Dict[int, List[float]]:
    """{k: IoU of each ground-truth mask after k points} for one image (the predictor's image set).

    All of the image's objects advance together: one batched decoder call per click.
    """
    if not gt_masks:
        return {k: [] for k in n_points}
    gts = [np.asarray(g, bool) for g in gt_masks]
    coords = [[first_point(g)] for g in gts]
    labels = [[1] for _ in gts]
    out: Dict[int, List[float]] = {k: [] for k in n_points}
    logits = None
    for k in range(1, max(n_points) + 1):
        masks, iou, low_res = predictor.predict(
            point_coords=np.array(coords, dtype=float)[:, :k],
            point_labels=np.array(labels)[:, :k],
            mask_input=logits,
            multimask_output=k == 1,
        )
        best = iou.argmax(axis=1)
        rows = np.arange(len(gts))
        preds, logits = masks[rows, best], low_res[rows, best][:, None]
        if k in out:
            out[k] = [_iou(p, g) for p, g in zip(preds, gts)]
        for i, (g, p) in enumerate(zip(gts, preds)):
            click = next_point(g, p)
            if click is None:  # exact already: repeat the last click so prompts keep one shape
                coords[i].append(coords[i][-1])
                labels[i].append(labels[i][-1])
            else:
                coords[i].append(click[0])
                labels[i].append(click[1])
    return out
