"""Overlays of masks and prompts on images, for demos and previews."""

from typing import Iterable, Optional, Sequence

import cv2
import numpy as np

_PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [170, 110, 40],
    ],
    dtype=np.float32,
)


def overlay_masks(
    image: np.ndarray,
    masks: Iterable[np.ndarray],
    alpha: float = 0.5,
    points: Optional[Sequence[Sequence[float]]] = None,
    labels: Optional[Sequence[int]] = None,
    boxes: Optional[Sequence[Sequence[float]]] = None,
) -> np.ndarray:
    """Blend each mask in its own colour with outlines; draw points (green +, red -) and boxes.

    Larger masks are drawn first so that small ones stay visible on top.
    """
    out = image.astype(np.float32).copy()
    outlines = []
    masks = list(masks)
    order = sorted(range(len(masks)), key=lambda i: -int(np.count_nonzero(masks[i])))
    for i in order:
        mask = masks[i]
        color = _PALETTE[i % len(_PALETTE)]
        m = mask.astype(bool)
        out[m] = out[m] * (1 - alpha) + color * alpha
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines.append((contours, tuple(int(c) for c in color)))
    out = np.clip(out, 0, 255).astype(np.uint8)
    for contours, color in outlines:
        cv2.drawContours(out, contours, -1, color, 2)
    for box in boxes if boxes is not None else []:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 255, 255), 2)
    for j, pt in enumerate(points if points is not None else []):
        positive = labels is None or labels[j] == 1
        cv2.drawMarker(
            out,
            (int(round(pt[0])), int(round(pt[1]))),
            (0, 255, 0) if positive else (255, 0, 0),
            cv2.MARKER_STAR,
            18,
            2,
        )
    return out


def save_png(path, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")
