"""Mask-set agreement, as the paper's everything-mode mIoU measures it."""

from typing import Sequence

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
