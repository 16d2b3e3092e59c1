"""Mask-set agreement, as the paper's everything-mode mIoU measures it."""

from typing import Dict, Sequence

import numpy as np


def best_match_ious(reference: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> np.ndarray:
    """For each reference mask, the best IoU among the predicted masks (0 when there are none)."""
    if len(reference) == 0:
        return np.zeros(0)
    if len(predicted) == 0:
        return np.zeros(len(reference))
    a = np.stack([m.reshape(-1) for m in reference]).astype(np.float32)
    b = np.stack([m.reshape(-1) for m in predicted]).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return (inter / np.maximum(union, 1)).max(axis=1)


def rle_agreement(reference: Sequence[dict], predicted: Sequence[dict], found_iou: float = 0.5) -> Dict[str, float]:
    """How far two everything-mode answers for one image agree, computed on their COCO RLEs (no
    full-size arrays): the mean best IoU each way, and the reference masks found (best IoU >=
    `found_iou`) or missed, and predicted masks matching none. Two empty answers agree fully."""
    from pycocotools import mask as mask_utils

    n, m = len(reference), len(predicted)
    if n and m:
        ious = np.asarray(mask_utils.iou(list(predicted), list(reference), [0] * n)).reshape(m, n)
        to_reference, to_predicted = ious.max(0), ious.max(1)  # per reference mask, per predicted mask
    else:
        to_reference, to_predicted = np.zeros(n), np.zeros(m)
    reference_to_predicted = float(to_reference.mean()) if n else float(m == 0)
    predicted_to_reference = float(to_predicted.mean()) if m else float(n == 0)
    return {
        "agreement": (reference_to_predicted + predicted_to_reference) / 2,
        "reference_to_predicted": reference_to_predicted,
        "predicted_to_reference": predicted_to_reference,
        "reference_masks": n,
        "predicted_masks": m,
        "found": int((to_reference >= found_iou).sum()),
        "missed": int((to_reference < found_iou).sum()),
        "unmatched": int((to_predicted < found_iou).sum()),
    }
