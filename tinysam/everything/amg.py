"""Mask utilities of everything mode: point grids, crops, stability, boxes, small regions.

Semantics follow the official automatic mask generator (its outputs are our reference), with
functions written for the batched, filter-early pipeline of `generator.py`.
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import List, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) XY points at the cell centres (k + 0.5) / n of the unit square, row by row."""
    side = (np.arange(n_per_side) + 0.5) / n_per_side
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """One grid per crop layer, `scale_per_layer` times sparser per side at each deeper layer."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes: the whole image, then (2**i)**2 overlapping crops for each layer i >= 1."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for i in range(n_layers):
        n = 2 ** (i + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        x0s = [int((crop_w - overlap) * k) for k in range(n)]
        y0s = [int((crop_h - overlap) * k) for k in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i + 1)
    return boxes, layers


@lru_cache(maxsize=32)
def upsampling_matrices(
    low_res: int, img_size: int, input_size: Tuple[int, int], original_size: Tuple[int, int], device: str = "cpu"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`Sam.postprocess_masks` (bilinear to the padded input, crop, bilinear to the original size)
    as one matrix per axis: logits (k, low, low) -> rows @ logits @ cols.T, (k, H, W).

    Bilinear resizing is separable and linear, so the two resizes and the crop compose into
    (H, low) and (W, low) matrices. Built from PyTorch's own 1-D interpolation weights (float32,
    as its kernels compute them), composed in float64: results equal the two interpolate calls
    to ~1e-5.
    """

    def axis(n_input: int, n_out: int) -> torch.Tensor:
        up = F.interpolate(torch.eye(low_res)[None], size=img_size, mode="linear", align_corners=False)[0, :, :n_input]
        down = F.interpolate(torch.eye(n_input)[None], size=n_out, mode="linear", align_corners=False)[0]
        return (up.double() @ down.double()).T.float().contiguous().to(device)

    return axis(input_size[0], original_size[0]), axis(input_size[1], original_size[1])


def upsample_logits(
    low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int], img_size: int
) -> torch.Tensor:
    """(k, low, low) decoder logits -> (k, H, W) logits at the original size, via `upsampling_matrices`:
    two dense products, few large kernels (an accelerator's way; the CPU path uses `upsample_window`)."""
    rows, cols = upsampling_matrices(
        low_res.shape[-1], img_size, tuple(input_size), tuple(original_size), str(low_res.device)
    )
    return rows @ (low_res @ cols.T)


@dataclass(frozen=True)
class AxisReads:
    """One axis of `upsampling_matrices`: the (out, low) matrix and, per output pixel, the span
    [first, stop) of low-res logits it reads (non-decreasing along the axis, as in any resize)."""

    matrix: torch.Tensor
    first: np.ndarray
    stop: np.ndarray
    block: int = 64  # outputs per matmul: each block reads only its own few low-res logits

    @classmethod
    def from_dense(cls, m: torch.Tensor) -> "AxisReads":
        return cls(m, *_true_spans((m != 0).cpu().numpy()))

    def window(self, lo: int, hi: int) -> Tuple[int, int, int, int]:
        """(o0, o1, i0, i1): the outputs [o0, o1) that read any of the low-res logits [lo, hi),
        and the logits [i0, i1) those outputs read."""
        o0 = int(np.searchsorted(self.stop, lo, side="right"))
        o1 = int(np.searchsorted(self.first, hi, side="left"))
        if o1 <= o0:
            return o0, o0, 0, 0
        return o0, o1, int(self.first[o0]), int(self.stop[o1 - 1])

    def apply(self, x: torch.Tensor, o0: int, o1: int, i0: int, dim: int) -> torch.Tensor:
        """Outputs [o0, o1) of the resize along `dim` of x, which holds the logits [i0, ...) there:
        block by block, each block's rows times only the logits they read."""
        parts = []
        for b0 in range(o0, o1, self.block):
            b1 = min(b0 + self.block, o1)
            f, s = int(self.first[b0]), int(self.stop[b1 - 1])
            m = self.matrix[b0:b1, f:s]
            xs = x.narrow(dim, f - i0, s - f)
            parts.append(m @ xs if dim == 0 else xs @ m.T)
        if not parts:
            shape = list(x.shape)
            shape[dim] = 0
            return x.new_zeros(shape)
        return torch.cat(parts, dim=dim)


@lru_cache(maxsize=32)
def upsampling_reads(
    low_res: int, img_size: int, input_size: Tuple[int, int], original_size: Tuple[int, int]
) -> Tuple[AxisReads, AxisReads]:
    """`upsampling_matrices` (on the CPU) with what each output row and column reads."""
    rows, cols = upsampling_matrices(low_res, img_size, input_size, original_size)
    return AxisReads.from_dense(rows), AxisReads.from_dense(cols)


def upsample_window(
    low_res: torch.Tensor, rows: AxisReads, cols: AxisReads, row_span: Tuple[int, int], col_span: Tuple[int, int]
) -> Tuple[torch.Tensor, int, int]:
    """The full-resolution logits of one (low, low) mask over the outputs that read its low-res
    rows `row_span` and columns `col_span`: (logits (h, w), top, left).

    Bilinear weights are non-negative and each output's sum to 1, so an output pixel is a convex
    combination of the logits it reads: where all of them are at most some t, so is the pixel.
    Outside the window of the logits above t, every pixel is at most t: everything mode computes
    only this window of each mask, with t just below its lowest threshold.
    """
    y0, y1, r0, r1 = rows.window(*row_span)
    x0, x1, c0, c1 = cols.window(*col_span)
    x = cols.apply(low_res[r0:r1, c0:c1], x0, x1, c0, dim=1)
    return rows.apply(x, y0, y1, r0, dim=0), y0, x0


def _true_spans(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """[first, stop) of the True entries of each row of a 2-D boolean array; (0, 0) for a row without."""
    has = a.any(1)
    return np.where(has, a.argmax(1), 0), np.where(has, a.shape[1] - a[:, ::-1].argmax(1), 0)


def low_res_spans(above: torch.Tensor) -> np.ndarray:
    """(k, 4) [row start, row stop, column start, column stop) of the True cells of each of (k, h, w)
    boolean masks; (0, 0, 0, 0) for an empty one."""
    rows, cols = _true_spans(above.any(2).cpu().numpy()), _true_spans(above.any(1).cpu().numpy())
    return np.stack([*rows, *cols], axis=1)


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at +offset and -offset around the mask threshold, per mask."""
    inter = (logits > (mask_threshold + offset)).flatten(1).sum(-1, dtype=torch.int32)
    union = (logits > (mask_threshold - offset)).flatten(1).sum(-1, dtype=torch.int32)
    return inter / union


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) XYXY with inclusive max coordinates; [0, 0, 0, 0] for empty masks."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    ar_h, ar_w = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    bottom = (rows * ar_h).amax(-1)
    top = torch.where(rows, ar_h, h).amin(-1)
    right = (cols * ar_w).amax(-1)
    left = torch.where(cols, ar_w, w).amin(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = (right < left) | (bottom < top)
    return boxes * (~empty)[:, None]


def window_box(mask: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """(4,) XYXY box (inclusive max, long) of an (h, w) boolean window placed at (top, left):
    `masks_to_boxes_xyxy` of the whole mask, [0, 0, 0, 0] when empty."""
    rows = mask.any(1).nonzero()
    if not len(rows):
        return torch.zeros(4, dtype=torch.long)
    cols = mask.any(0).nonzero()
    return torch.stack([cols[0, 0] + left, rows[0, 0] + top, cols[-1, 0] + left, rows[-1, 0] + top])


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: List[int], orig_box: List[int], atol: float = 20.0
) -> torch.Tensor:
    """Boxes (in crop coordinates) touching a crop edge that is not also an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = boxes.float() + crop[[0, 1, 0, 1]]
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than `area_thresh`; says if it changed."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[1:, -1]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def box_xyxy_to_xywh(box: List[float]) -> List[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]
