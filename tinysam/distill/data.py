"""Training targets from SA-1B style annotations: each labelled mask at the decoder's 256x256
resolution of the padded 1024x1024 input frame (where the student's mask logits live)."""

import json
from typing import Any, List, Sequence, Tuple

import numpy as np

LOW_RES = 256


def annotation_list(annotations: Any) -> List[dict]:
    """The annotations of an SA-1B document, a JSON string of one, or a plain list."""
    if isinstance(annotations, (str, bytes)):
        annotations = json.loads(annotations) if annotations else []
    if isinstance(annotations, dict):
        annotations = annotations.get("annotations", [])
    return list(annotations or [])


def decode_segmentation(segmentation: dict, size: Tuple[int, int]) -> np.ndarray:
    """A COCO RLE (compressed or uncompressed counts) -> bool (H, W)."""
    from pycocotools import mask as mask_utils

    rle = segmentation
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *size)
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def label_masks(
    annotations: Any, orig_size: Sequence[int], input_size: Sequence[int], max_masks: int, min_cells: int = 4
) -> np.ndarray:
    """Labelled masks as uint8 (max_masks, 256, 256), zero-padded: resized like the image (longest
    side to 1024, then a quarter), largest first; masks under `min_cells` cells are dropped (a
    prompt needs a cell to land in). Returns only the filled rows."""
    import cv2

    h, w = int(orig_size[0]), int(orig_size[1])
    lh, lw = (int(input_size[0]) + 3) // 4, (int(input_size[1]) + 3) // 4
    anns = sorted(annotation_list(annotations), key=lambda a: -float(a.get("area", 0)))
    out = []
    for ann in anns:
        if len(out) == max_masks:
            break
        mask = decode_segmentation(ann["segmentation"], (h, w))
        small = cv2.resize(mask.astype(np.float32), (lw, lh), interpolation=cv2.INTER_AREA) >= 0.5
        if small.sum() < min_cells:
            continue
        canvas = np.zeros((LOW_RES, LOW_RES), np.uint8)
        canvas[:lh, :lw] = small
        out.append(canvas)
    return np.stack(out) if out else np.zeros((0, LOW_RES, LOW_RES), np.uint8)
