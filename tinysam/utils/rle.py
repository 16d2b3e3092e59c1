"""Mask encodings: COCO RLE (pycocotools) and SAM's uncompressed RLE, with bbox and area."""

from typing import Any, Dict, List

import numpy as np
from pycocotools import mask as mask_utils


def mask_to_coco_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Binary HxW mask -> COCO RLE {"size": [h, w], "counts": str} (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def run_lengths(masks) -> List[np.ndarray]:
    """COCO's run lengths of each of (k, h, w) boolean masks (a torch tensor on any device):
    column-major, starting with a run of 0s. The changes are found where the masks are (diff and
    nonzero); only their positions, a few per row of a mask's outline, cross to the host."""
    k, h, w = masks.shape
    n = h * w
    flat = masks.transpose(1, 2).reshape(k, n)
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu().numpy()  # (m, 2): mask, position
    first = flat[:, 0].cpu().numpy()
    per_mask = np.split(changes[:, 1] + 1, np.searchsorted(changes[:, 0], np.arange(1, k)))
    out = []
    for starts, starts_with_one in zip(per_mask, first):
        counts = np.diff(np.concatenate([[0], starts, [n]]))
        out.append(np.concatenate([[0], counts]) if starts_with_one else counts)
    return out


def coco_rles_from_run_lengths(counts: List[np.ndarray], h: int, w: int) -> List[Dict[str, Any]]:
    """pycocotools' compressed RLEs of run lengths: byte for byte `mask_utils.encode`'s output."""
    return [mask_utils.frPyObjects({"size": [h, w], "counts": c.tolist()}, h, w) for c in counts]


def window_run_lengths(window: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """COCO's run lengths of an h x w mask that is 0 outside the boolean `window` placed at (top,
    left): computed from the window alone, so a small object costs its own size, not the image's."""
    wh, ww = window.shape
    padded = np.zeros((ww, wh + 2), bool)  # the window's columns, a 0 above and below each
    padded[:, 1:-1] = window.T
    col, row = np.nonzero(padded[:, 1:] != padded[:, :-1])
    changes = (left + col) * h + top + row  # flat column-major index of the first pixel after each change
    # A run through a full-height column's end into the next column shows as an end and a start at
    # the same index: no change at all.
    changes, seen = np.unique(changes, return_counts=True)
    changes = changes[(seen % 2 == 1) & (changes < h * w)]
    return np.diff(np.concatenate([[0], changes, [h * w]]))


def coco_rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> boolean HxW mask."""
    counts = rle["counts"]
    rle = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def mask_to_uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Binary HxW mask -> {"size": [h, w], "counts": [run lengths]} in column-major order, starting with 0s."""
    h, w = mask.shape
    flat = mask.astype(bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts: List[int] = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


def mask_bbox_xywh(mask: np.ndarray) -> List[int]:
    """Tight XYWH box of a binary mask ([0, 0, 0, 0] when empty)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return [0, 0, 0, 0]
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
