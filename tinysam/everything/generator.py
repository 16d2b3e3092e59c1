"""Automatic mask generation ("segment everything"), SAM-compatible and fast.

Same parameters, defaults and output records as the official `SamAutomaticMaskGenerator`; the work
is reorganised so that it costs less and holds less:
- the decoder shares each image's tokens among its prompts (see `modeling/transformer.py`), and
  takes the prompts of several images in one call;
- masks are filtered on the predicted IoU before anything is upsampled, and only the survivors
  are upsampled to full resolution, in small chunks, to compute stability, boxes and RLEs;
- full-resolution logits never exist for a whole point batch, and kept masks are stored as
  compressed COCO RLE, so memory stays bounded whatever the number of points.
"""

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops.boxes import batched_nms, box_area, box_iou

from ..modeling import Sam, folded_decoder
from ..transforms import ResizeLongestSide, prepare_image, to_rgb_uint8
from ..utils.malloc import allocation_for
from ..utils.rle import coco_rles_from_run_lengths, mask_to_uncompressed_rle, run_lengths, window_run_lengths
from .amg import (
    AxisReads,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    low_res_spans,
    masks_to_boxes_xyxy,
    remove_small_regions,
    stability_score,
    upsample_logits,
    upsample_window,
    upsampling_reads,
    window_box,
)
from .config import DEFAULTS

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# `low_res_decisions`: candidates whose stability score on the 256x256 logits is within this of the
# threshold are scored again at full resolution. The low-res score runs ~0.006 below the exact
# one, with a spread of ~0.01 (docs/benchmarks.md, "Deciding on the low-res logits").
LOW_RES_STABILITY_BAND = 0.02
# ...and so are small masks, whatever their score: over a few cells the low-res score moves in
# large steps (a 35x28-pixel object in a 2250-pixel photo covers ~12 cells). Their windows are
# small, so scoring them exactly costs little.
LOW_RES_FEW_CELLS = 256
# Full-resolution logits one upsampling chunk may hold: 16 masks of 1024x1024, one of 16 Mpx (a
# chunk also holds its masks, their uint8 copy and the RLE encoder's Fortran-ordered copy).
UPSAMPLE_PIXELS = 16 * 1024 * 1024


@dataclass
class HighConfidenceArea:
    """Pixels of a crop already covered with confidence: logits above `threshold` in a kept mask."""

    area: np.ndarray  # (h, w) bool, crop coordinates
    threshold: float


@dataclass
class MaskSet:
    """Kept masks of one image (or crop) as compressed RLE plus their scores, before the final NMS."""

    rles: List[Dict[str, Any]] = field(default_factory=list)
    boxes: List[torch.Tensor] = field(default_factory=list)  # (k, 4) XYXY in image coordinates
    iou_preds: List[torch.Tensor] = field(default_factory=list)
    stability: List[torch.Tensor] = field(default_factory=list)
    points: List[torch.Tensor] = field(default_factory=list)  # (k, 2) XY in image coordinates
    crop_boxes: List[torch.Tensor] = field(default_factory=list)

    def cat(self) -> Dict[str, Any]:
        def stack(xs, shape):
            return torch.cat(xs) if xs else torch.zeros(shape)

        return {
            "rles": self.rles,
            "boxes": stack(self.boxes, (0, 4)),
            "iou_preds": stack(self.iou_preds, (0,)),
            "stability": stack(self.stability, (0,)),
            "points": stack(self.points, (0, 2)),
            "crop_boxes": stack(self.crop_boxes, (0, 4)),
        }


def _select(data: Dict[str, Any], keep: torch.Tensor) -> Dict[str, Any]:
    idx = keep.tolist()
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[keep]) for k, v in data.items()}


def _merge(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    return {k: (sum((p[k] for p in parts), []) if k == "rles" else torch.cat([p[k] for p in parts])) for k in parts[0]}


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = DEFAULTS.points_per_side,
        points_per_batch: int = DEFAULTS.points_per_batch,
        pred_iou_thresh: float = DEFAULTS.pred_iou_thresh,
        stability_score_thresh: float = DEFAULTS.stability_score_thresh,
        stability_score_offset: float = DEFAULTS.stability_score_offset,
        box_nms_thresh: float = DEFAULTS.box_nms_thresh,
        crop_n_layers: int = DEFAULTS.crop_n_layers,
        crop_nms_thresh: float = DEFAULTS.crop_nms_thresh,
        crop_overlap_ratio: float = DEFAULTS.crop_overlap_ratio,
        crop_n_points_downscale_factor: int = DEFAULTS.crop_n_points_downscale_factor,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = DEFAULTS.min_mask_region_area,
        output_mode: str = "binary_mask",
        upsample_chunk: int = DEFAULTS.upsample_chunk,
        decoder_chunk: int = DEFAULTS.decoder_chunk,
        fast_decoder: bool = DEFAULTS.fast_decoder,
        decoder_dtype: str = DEFAULTS.decoder_dtype,
        low_res_decisions: bool = False,
    ) -> None:
        """Arguments as the official generator's (see its docs), plus: `upsample_chunk` bounds how
        many masks an accelerator holds at full resolution at once (fewer on large images: at most
        UPSAMPLE_PIXELS of logits a chunk, so peak memory grows with the pixels, not pixels times
        masks; the CPU upsamples one mask's window at a time), `decoder_chunk` how many prompts go
        through the decoder at once (~25 MiB of activations each: they dominate peak memory);
        `fast_decoder` runs the decoder folded (see
        `modeling/folded_decoder.py`; a quantized decoder gets the channels-last upscaling instead),
        False the plain decoder with the official rounding; `decoder_dtype` "bfloat16" runs the
        decoder on a bfloat16 copy of its weights (see `reduced_precision_decoder`);
        `low_res_decisions` takes the stability, box and NMS decisions on the decoder's 256x256
        logits and draws only the masks NMS keeps at full resolution (see `_filter_low_res`). Off
        by default in the generator classes, drop-ins for the official one; on in
        `EverythingConfig`, the jobs' and presets' default but for `quality`."""
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side and point_grids must be given")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_side is not None:
            point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        if len(point_grids) != crop_n_layers + 1:
            raise ValueError(f"{len(point_grids)} point grids given for {crop_n_layers + 1} crop layers")
        self.model = model
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.point_grids = point_grids
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.upsample_chunk = upsample_chunk
        self.decoder_chunk = decoder_chunk
        self.low_res_decisions = low_res_decisions
        decoder = model.mask_decoder
        if decoder_dtype != "float32":
            decoder = reduced_precision_decoder(decoder, getattr(torch, decoder_dtype))
        self._decoder_dtype = next(decoder.parameters()).dtype
        self._mask_decoder = folded_decoder.fast_decoder(decoder) if fast_decoder else decoder
        self.last_stats: Dict[str, int] = {}

    # ---- public API -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks for everything in one HxWx3 image, as a list of SAM records."""
        return self.generate_batch([image])[0]

    @torch.inference_mode()
    def generate_batch(self, images: Sequence[np.ndarray]) -> List[List[Dict[str, Any]]]:
        """Masks for several images; their crops share encoder batches and decoder calls."""
        images = [to_rgb_uint8(im, f"image {i}") for i, im in enumerate(images)]
        jobs = []  # (image index, crop box, layer index)
        for i, image in enumerate(images):
            boxes, layers = generate_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            jobs += [(i, box, layer) for box, layer in zip(boxes, layers)]
        crops = [images[i][box[1] : box[3], box[0] : box[2]] for i, box, _ in jobs]
        embeddings, input_sizes = self._encode(crops)
        return self._generate(embeddings, input_sizes, jobs, [im.shape[:2] for im in images])

    @torch.inference_mode()
    def generate_from_embeddings(
        self, embeddings: torch.Tensor, input_sizes: Sequence[Tuple[int, int]], orig_sizes: Sequence[Tuple[int, int]]
    ) -> List[List[Dict[str, Any]]]:
        """Masks for images whose encoder output is known (e.g. stored by the precompute job).

        `embeddings` (n, 256, 64, 64) in any float type, `input_sizes` the resized (h, w) the
        encoder saw, `orig_sizes` the images' (h, w). Crop layers need the pixels: use `generate_batch`.
        """
        if self.crop_n_layers:
            raise ValueError("crop layers encode crops of the image: use generate_batch with the images")
        if not (len(embeddings) == len(input_sizes) == len(orig_sizes)):
            raise ValueError(
                f"{len(embeddings)} embeddings for {len(input_sizes)} input and {len(orig_sizes)} image sizes"
            )
        jobs = [(i, [0, 0, int(w), int(h)], 0) for i, (h, w) in enumerate(orig_sizes)]
        param = next(self.model.mask_decoder.parameters())
        embeddings = embeddings.to(device=param.device, dtype=param.dtype)
        sizes = [(int(h), int(w)) for h, w in orig_sizes]
        return self._generate(embeddings, [(int(h), int(w)) for h, w in input_sizes], jobs, sizes)

    def _generate(self, embeddings, input_sizes, jobs, image_sizes) -> List[List[Dict[str, Any]]]:
        """Crops' embeddings -> records per image: decode and filter each crop, merge crops, post-process."""
        with allocation_for(max(h * w for h, w in image_sizes)):  # see tinysam/utils/malloc.py
            return self._generate_records(embeddings, input_sizes, jobs, image_sizes)

    def _generate_records(self, embeddings, input_sizes, jobs, image_sizes) -> List[List[Dict[str, Any]]]:
        self.last_stats = {"decoded_points": 0}
        crop_sizes = [(box[3] - box[1], box[2] - box[0]) for _, box, _ in jobs]
        orig_sizes = [image_sizes[i] for i, _, _ in jobs]
        crop_results = self._process_crops(embeddings, input_sizes, crop_sizes, jobs, orig_sizes)
        per_image: List[List[Dict[str, Any]]] = []
        for i in range(len(image_sizes)):
            parts = [r for (j, _, _), r in zip(jobs, crop_results) if j == i]
            data = _merge(parts)
            if len(parts) > 1 and len(data["rles"]):
                scores = 1 / box_area(data["crop_boxes"].float())
                keep = batched_nms(data["boxes"].float(), scores, torch.zeros(len(scores)), self.crop_nms_thresh)
                data = _select(data, keep)
            if self.min_mask_region_area > 0:
                data = self._remove_small_regions(data)
            per_image.append(self._to_records(data))
        return per_image

    # ---- stages ------------------------------------------------------------------------------

    def _encode(self, crops: Sequence[np.ndarray]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        prepared = [prepare_image(c) for c in crops]
        x = torch.stack([p.tensor for p in prepared]).to(self.model.device)
        return self.model.image_encoder(x), [p.input_size for p in prepared]

    def _process_crops(self, embeddings, input_sizes, crop_sizes, jobs, orig_sizes) -> List[Dict[str, Any]]:
        """Dense grid of each crop -> filtered, NMS-ed masks of that crop in image coordinates."""
        points = [self.point_grids[layer] * np.array(size)[None, ::-1] for size, (_, _, layer) in zip(crop_sizes, jobs)]
        sets = self._decode_and_filter(embeddings, input_sizes, crop_sizes, jobs, orig_sizes, points)
        return [self._crop_nms(s.cat()) for s in sets]

    def _crop_nms(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if len(data["rles"]) == 0:
            return data
        if any(isinstance(r, _PendingMask) for r in data["rles"]):
            return self._nms_drawing_kept(data)
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros(len(data["rles"])), self.box_nms_thresh
        )
        return _select(data, keep)

    def _nms_drawing_kept(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """The crop's NMS over `_PendingMask` candidates (`low_res_decisions`), drawing at full
        resolution only what it needs: greedy, by predicted IoU as `batched_nms`, on exact boxes.
        A candidate whose box, wherever it lies between its low-res bounds
        (`_PendingMask.box_bounds`), overlaps a kept mask above the threshold is dropped undrawn:
        most candidates, the near-duplicates of each object. Any other is drawn and decided on
        its exact box (the low-res box can be far wider than the mask, where faint logits lie
        away from it). A drawn mask whose exact stability score fails the threshold is dropped
        before it can suppress anything: it would not exist at full resolution."""
        thr, offset, nms = self.model.mask_threshold, self.stability_score_offset, self.box_nms_thresh
        data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].clone(), stability=data["stability"].clone())
        kept: List[int] = []
        for i in torch.argsort(data["iou_preds"], descending=True, stable=True).tolist():
            candidate = data["rles"][i]
            others = data["boxes"][kept].float()
            if kept and isinstance(candidate, _PendingMask):
                if bool((_least_iou(candidate.box_bounds(data["boxes"][i].float()), others) > nms).any()):
                    continue
            if isinstance(candidate, _PendingMask):
                _draw(data, i, thr, offset)
            if self.stability_score_thresh > 0.0 and not bool(data["stability"][i] >= self.stability_score_thresh):
                continue
            if kept and bool((box_iou(data["boxes"][i : i + 1].float(), others)[0] > nms).any()):
                continue
            kept.append(i)
        return _select(data, torch.tensor(kept, dtype=torch.long))

    def _decode_and_filter(self, embeddings, input_sizes, crop_sizes, jobs, orig_sizes, points, high_conf=None):
        """Decode every crop's points in shared batches and keep the masks that pass the filters.

        `high_conf`, when given, holds one `HighConfidenceArea` per crop, into which the pixels
        of each kept mask whose full-resolution logits exceed its threshold are OR-ed
        (round 1 of the hierarchical strategy).
        """
        sets = [MaskSet() for _ in crop_sizes]
        n_batches = max((len(p) + self.points_per_batch - 1) // self.points_per_batch for p in points)
        for b in range(n_batches):
            active = [i for i, p in enumerate(points) if b * self.points_per_batch < len(p)]
            chunks = [points[i][b * self.points_per_batch : (b + 1) * self.points_per_batch] for i in active]
            sizes = [len(c) for c in chunks]
            width = max(sizes)
            padded = np.stack([np.concatenate([c, np.repeat(c[-1:], width - len(c), 0)]) for c in chunks])
            coords = torch.as_tensor(
                self._to_input_frame(padded, [crop_sizes[i] for i in active]),
                dtype=torch.float32,
                device=self.model.device,
            )
            low_res, iou = self._decode(embeddings[active], coords.reshape(-1, 1, 2))
            low_res = low_res.view(len(active), width * 3, *low_res.shape[-2:])
            iou = iou.view(len(active), width * 3)
            for k, i in enumerate(active):
                n = sizes[k] * 3
                self.last_stats["decoded_points"] += sizes[k]
                _, crop_box, _ = jobs[i]
                self._filter_batch(
                    sets[i],
                    low_res[k, :n],
                    iou[k, :n],
                    np.repeat(chunks[k], 3, axis=0),
                    input_sizes[i],
                    crop_sizes[i],
                    crop_box,
                    orig_sizes[i],
                    None if high_conf is None else high_conf[i],
                )
        return sets

    def _to_input_frame(self, points: np.ndarray, sizes: Sequence[Tuple[int, int]]) -> np.ndarray:
        """Scale (n, P, 2) crop-pixel points into each crop's resized frame (the predictor's transform)."""
        return np.stack([self.transform.apply_coords(p, size) for p, size in zip(points, sizes)])

    def _decode(self, embeddings: torch.Tensor, coords: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode (n * P) single-point prompts, P per image, in chunks of at most `decoder_chunk`
        prompts: the decoder's activations grow with the chunk, not with the point batch."""
        n, per_image = embeddings.shape[0], coords.shape[0] // embeddings.shape[0]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        dtype = self._decoder_dtype
        pe = self.model.prompt_encoder.get_dense_pe().to(dtype)
        embeddings = embeddings.to(dtype)
        step = max(1, self.decoder_chunk // n) if n <= self.decoder_chunk else per_image
        low_parts, iou_parts = [], []
        for start in range(0, per_image, step):
            sel = torch.cat(
                [torch.arange(i * per_image + start, i * per_image + min(start + step, per_image)) for i in range(n)]
            )
            sparse, dense = self.model.prompt_encoder((coords[sel], labels[sel]), None, None)
            low_res, iou = self._mask_decoder(embeddings, pe, sparse.to(dtype), dense.to(dtype), multimask_output=True)
            low_parts.append(low_res.float().view(n, -1, *low_res.shape[1:]))
            iou_parts.append(iou.float().view(n, -1, iou.shape[-1]))
        low_res = torch.cat(low_parts, dim=1).flatten(0, 2)
        iou = torch.cat(iou_parts, dim=1).flatten(0, 2)
        return low_res, iou

    def _filter_batch(
        self, out: MaskSet, low_res, iou, points, input_size, crop_size, crop_box, orig_size, high_conf=None
    ) -> None:
        """IoU filter on low-res outputs, then stability/box/edge filters at full resolution: each
        mask's own window on the CPU, chunks of whole masks on an accelerator."""
        keep = torch.arange(len(iou), device=iou.device)
        if self.pred_iou_thresh > 0.0:
            keep = keep[iou > self.pred_iou_thresh]
        args = (out, low_res, iou, keep, points, input_size, crop_size, crop_box, orig_size, high_conf)
        if self.low_res_decisions:
            self._filter_low_res(*args)
        elif filters_per_window(low_res.device):
            self._filter_windows(*args)
        else:
            self._filter_chunks(*args)

    def _filter_windows(
        self, out: MaskSet, low_res, iou, keep, points, input_size, crop_size, crop_box, orig_size, high_conf
    ) -> None:
        """Full-resolution filters on the window of each mask where its logits can pass the lowest
        threshold (`amg.upsample_window`): the same masks as whole-image upsampling, at the cost of
        the object's size instead of the image's (most masks are small parts of large photos)."""
        if not len(keep):
            return
        thr, offset = self.model.mask_threshold, self.stability_score_offset
        lowest = thr - abs(offset) - 0.01  # a margin over the float rounding of the resize
        if high_conf is not None:
            lowest = min(lowest, high_conf.threshold - 0.01)
        lows = low_res[keep].float()
        spans = low_res_spans(lows > lowest)
        rows, cols = upsampling_reads(lows.shape[-1], self.model.image_encoder.img_size, input_size, crop_size)
        orig_h, orig_w = orig_size
        x0, y0 = crop_box[0], crop_box[1]
        kept, boxes, stabs = [], [], []
        for j, (r0, r1, c0, c1) in enumerate(spans.tolist()):
            logits, top, left = upsample_window(lows[j], rows, cols, (r0, r1), (c0, c1))
            stab = _window_stability(logits, thr, offset)
            if self.stability_score_thresh > 0.0 and not (stab >= self.stability_score_thresh).item():
                continue
            mask = logits > thr
            box = window_box(mask, top, left)
            if is_box_near_crop_edge(box[None], crop_box, [0, 0, orig_w, orig_h])[0]:
                continue
            if high_conf is not None:
                hh, ww = logits.shape
                high_conf.area[top : top + hh, left : left + ww] |= (logits > high_conf.threshold).numpy()
            out.rles += coco_rles_from_run_lengths(
                [window_run_lengths(mask.numpy(), y0 + top, x0 + left, orig_h, orig_w)], orig_h, orig_w
            )
            kept.append(j)
            boxes.append(box)
            stabs.append(stab)
        if not kept:
            return
        idx = keep[kept]
        out.boxes.append(torch.stack(boxes) + torch.tensor([x0, y0, x0, y0]))
        out.iou_preds.append(iou[idx].float().cpu())
        out.stability.append(torch.stack(stabs).float())
        out.points.append(torch.as_tensor(points[idx.numpy()], dtype=torch.float64) + torch.tensor([x0, y0]))
        out.crop_boxes.append(torch.tensor([crop_box] * len(idx)))

    def _filter_low_res(
        self, out: MaskSet, low_res, iou, keep, points, input_size, crop_size, crop_box, orig_size, high_conf
    ) -> None:
        """Stability and box filters on the 256x256 logits; full resolution is left for later.

        Each candidate is kept as a `_PendingMask`: its logits over the low-res window its
        full-resolution mask reads, drawn only if the crop's NMS needs it (`_nms_drawing_kept`). Most
        candidates are near-duplicates that NMS drops, so full-resolution work, and the memory it
        needs, follows the kept masks. The decisions differ from the full-resolution ones near
        their thresholds:
        - stability counts the low-res logits over the part of the 256x256 frame the image covers;
        - the NMS and crop-edge box is where the resized row and column maxima exceed the mask
          threshold: it contains the full-resolution box, usually within a pixel or two (far
          wider where faint logits lie away from the mask), so a mask may leave a crop edge
          filter that its exact box would pass.
        Candidates near the stability threshold, and small ones, are scored exactly here; the
        drawn masks get their exact boxes and stability scores, as in full-resolution mode."""
        if not len(keep):
            return
        thr, offset = self.model.mask_threshold, self.stability_score_offset
        lowest = thr - abs(offset) - 0.01  # as `_filter_windows`: every pixel the exact score counts
        lows = low_res[keep].float().cpu()
        rows, cols = upsampling_reads(lows.shape[-1], self.model.image_encoder.img_size, input_size, crop_size)
        seen = lows[:, : int(rows.stop[-1]), : int(cols.stop[-1])]  # the logits the image reads
        inter = (seen > thr + offset).flatten(1).sum(1)
        union = (seen > thr - offset).flatten(1).sum(1)
        stab = inter / union.clamp(min=1)
        ok = union > 0
        if self.stability_score_thresh > 0.0:
            # near the threshold the low-res score is not trusted: those candidates are scored
            # exactly, on their full-resolution window, as `_filter_windows` scores every one
            near = ok & (
                ((stab - self.stability_score_thresh).abs() < LOW_RES_STABILITY_BAND) | (union < LOW_RES_FEW_CELLS)
            )
            for j in near.nonzero()[:, 0].tolist():
                r0, r1, c0, c1 = low_res_spans(lows[j : j + 1] > lowest)[0].tolist()
                logits, _, _ = upsample_window(lows[j], rows, cols, (r0, r1), (c0, c1))
                stab[j] = _window_stability(logits, thr, offset)
            ok &= stab >= self.stability_score_thresh
        idx = ok.nonzero()[:, 0]
        if not len(idx):
            return
        # a pixel's logit is a convex combination of the logits it reads: resizing each row's
        # (column's) maximum bounds the mask's extent along the other axis
        col_extent = seen[idx].amax(1) @ cols.matrix[:, : seen.shape[2]].T > thr
        row_extent = seen[idx].amax(2) @ rows.matrix[:, : seen.shape[1]].T > thr
        boxes = torch.stack([*_extent(col_extent), *_extent(row_extent)], 1)[:, [0, 2, 1, 3]]
        orig_h, orig_w = orig_size
        near_edge = is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        idx, boxes = idx[~near_edge], boxes[~near_edge]
        if not len(idx):
            return
        spans = low_res_spans(lows[idx] > lowest)
        for j, (r0, r1, c0, c1) in zip(idx.tolist(), spans.tolist()):
            out.rles.append(_PendingMask(lows[j], rows, cols, (r0, r1), (c0, c1), crop_box, orig_size))
        if high_conf is not None:  # the confident cores only: a small part of each window
            tau = high_conf.threshold
            for j, (r0, r1, c0, c1) in zip(idx.tolist(), low_res_spans(lows[idx] > tau - 0.01).tolist()):
                if r1 > r0:
                    logits, top, left = upsample_window(lows[j], rows, cols, (r0, r1), (c0, c1))
                    hh, ww = logits.shape
                    high_conf.area[top : top + hh, left : left + ww] |= (logits > tau).numpy()
        x0, y0 = crop_box[0], crop_box[1]
        kept = keep.cpu()[idx]
        out.boxes.append(boxes + torch.tensor([x0, y0, x0, y0]))
        out.iou_preds.append(iou[keep][idx.to(iou.device)].float().cpu())
        out.stability.append(stab[idx].float())
        out.points.append(torch.as_tensor(points[kept.numpy()], dtype=torch.float64) + torch.tensor([x0, y0]))
        out.crop_boxes.append(torch.tensor([crop_box] * len(idx)))

    def _filter_chunks(
        self, out: MaskSet, low_res, iou, keep, points, input_size, crop_size, crop_box, orig_size, high_conf
    ) -> None:
        """Full-resolution filters on chunks of whole masks (few large kernels: an accelerator's way)."""
        orig_h, orig_w = orig_size
        x0, y0 = crop_box[0], crop_box[1]
        offset = torch.tensor([x0, y0, x0, y0])
        chunk = max(1, min(self.upsample_chunk, UPSAMPLE_PIXELS // max(1, crop_size[0] * crop_size[1])))
        for start in range(0, len(keep), chunk):
            idx = keep[start : start + chunk]
            logits = upsample_logits(low_res[idx].float(), input_size, crop_size, self.model.image_encoder.img_size)
            stab = stability_score(logits, self.model.mask_threshold, self.stability_score_offset)
            ok = (
                stab >= self.stability_score_thresh
                if self.stability_score_thresh > 0.0
                else torch.ones_like(stab, dtype=torch.bool)
            )
            if not ok.any():
                continue
            idx, logits, stab = idx[ok], logits[ok], stab[ok]
            masks = logits > self.model.mask_threshold
            boxes = masks_to_boxes_xyxy(masks)
            ok = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            if not ok.any():
                continue
            idx, logits, masks, boxes, stab = idx[ok], logits[ok], masks[ok], boxes[ok], stab[ok]
            if high_conf is not None:
                high_conf.area |= (logits > high_conf.threshold).any(dim=0).cpu().numpy()
            out.rles += _encode_rles(masks, crop_box, orig_size)
            out.boxes.append(boxes.cpu() + offset)
            out.iou_preds.append(iou[idx].float().cpu())
            out.stability.append(stab.float().cpu())
            out.points.append(torch.as_tensor(points[idx.cpu().numpy()], dtype=torch.float64) + torch.tensor([x0, y0]))
            out.crop_boxes.append(torch.tensor([crop_box] * len(idx)))

    def _remove_small_regions(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """Fill small holes and drop small islands, then NMS again preferring unchanged masks."""
        if len(data["rles"]) == 0:
            return data
        masks, scores = [], []
        for rle in data["rles"]:
            mask = mask_utils.decode(rle).astype(bool)
            mask, changed_holes = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, changed_islands = remove_small_regions(mask, self.min_mask_region_area, "islands")
            masks.append(mask)
            scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
        boxes = masks_to_boxes_xyxy(torch.as_tensor(np.stack(masks)))
        keep = batched_nms(
            boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), max(self.box_nms_thresh, self.crop_nms_thresh)
        )
        data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].clone())
        for i in keep.tolist():
            if scores[i] == 0.0:
                data["rles"][i] = _encode_rle(masks[i])
                data["boxes"][i] = boxes[i]
        return _select(data, keep)

    def _to_records(self, data: Dict[str, Any]) -> List[Dict[str, Any]]:
        records = []
        for i, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                seg: Any = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            else:
                mask = mask_utils.decode(rle).astype(bool)
                seg = mask if self.output_mode == "binary_mask" else mask_to_uncompressed_rle(mask)
            records.append(
                {
                    "segmentation": seg,
                    "area": int(mask_utils.area(rle)),
                    "bbox": box_xyxy_to_xywh(data["boxes"][i].tolist()),
                    "predicted_iou": float(data["iou_preds"][i]),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": float(data["stability"][i]),
                    "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i].tolist()),
                }
            )
        return records


@dataclass
class _PendingMask:
    """A candidate kept on its low-res logits (`_filter_low_res`): the window of them its
    full-resolution mask reads, and where that mask goes."""

    low_res: torch.Tensor  # (low, low) logits; only the window below is kept
    rows: AxisReads  # how the crop's rows and columns read the low-res logits
    cols: AxisReads
    row_span: Tuple[int, int]  # the low-res cells above the lowest threshold
    col_span: Tuple[int, int]
    crop_box: List[int]
    orig_size: Tuple[int, int]

    def __post_init__(self) -> None:
        _, _, r0, r1 = self.rows.window(*self.row_span)
        _, _, c0, c1 = self.cols.window(*self.col_span)
        self.low_res = self.low_res[r0:r1, c0:c1].clone()  # the candidate holds its window only

    def box_bounds(self, box: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(outer, inner) boxes around the drawn mask's, from its low-res `box` (image
        coordinates): the low-res box contains the mask's, which reaches within about a low-res
        cell of each of its sides (a cell spans the output pixels over the image's low-res
        cells, plus one for rounding)."""
        cell_y = self.rows.matrix.shape[0] / float(self.rows.stop[-1]) + 1
        cell_x = self.cols.matrix.shape[0] / float(self.cols.stop[-1]) + 1
        inner = box + torch.tensor([cell_x, cell_y, -cell_x, -cell_y])
        inner[2:] = torch.maximum(inner[2:], inner[:2])
        return box, inner

    def logits(self) -> Tuple[torch.Tensor, int, int]:
        """(full-resolution logits of the window, top, left) in crop coordinates: what
        `amg.upsample_window` computes from the whole low-res mask."""
        y0, y1, r0, _ = self.rows.window(*self.row_span)
        x0, x1, c0, _ = self.cols.window(*self.col_span)
        x = self.cols.apply(self.low_res, x0, x1, c0, dim=1)
        return self.rows.apply(x, y0, y1, r0, dim=0), y0, x0


def _draw(data: Dict[str, Any], i: int, threshold: float, offset: float) -> None:
    """Draw candidate `i`, a `_PendingMask`, at full resolution in place: its RLE, exact box and
    stability score, computed as `_filter_windows` computes them."""
    p = data["rles"][i]
    logits, top, left = p.logits()
    mask = logits > threshold
    x0, y0 = p.crop_box[0], p.crop_box[1]
    orig_h, orig_w = p.orig_size
    data["stability"][i] = _window_stability(logits, threshold, offset)
    data["boxes"][i] = window_box(mask, top, left) + torch.tensor([x0, y0, x0, y0])
    run = window_run_lengths(mask.numpy(), y0 + top, x0 + left, orig_h, orig_w)
    data["rles"][i] = coco_rles_from_run_lengths([run], orig_h, orig_w)[0]


def _window_stability(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """The stability score of one mask from the window of its logits that holds every logit
    above threshold - |offset| (`amg.upsample_window`): the same as over the whole mask."""
    return torch.count_nonzero(logits > threshold + offset) / torch.count_nonzero(logits > threshold - offset)


def _least_iou(bounds: Tuple[torch.Tensor, torch.Tensor], others: torch.Tensor) -> torch.Tensor:
    """The least IoU with each of `others` (k, 4) of a box known to lie between an outer and an
    inner box (both (4,), XYXY as `box_iou` takes them)."""
    outer, inner = bounds
    wh = (torch.minimum(inner[2:], others[:, 2:]) - torch.maximum(inner[:2], others[:, :2])).clamp(min=0)
    least = wh[:, 0] * wh[:, 1]
    return least / (box_area(outer[None])[0] + box_area(others) - least).clamp(min=1e-6)


def _extent(above: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and last True index of each row of (k, n) booleans (0, 0 for a row without)."""
    n = above.shape[1]
    ar = torch.arange(n)
    first = torch.where(above, ar, n).amin(1)
    last = (above * ar).amax(1)
    has = above.any(1)
    return torch.where(has, first, 0), torch.where(has, last, 0)


def reduced_precision_decoder(decoder: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `decoder` in `dtype` (the model's own stays float32 for the predictor). Pays where
    the hardware multiplies that type natively (AVX512-BF16 or AMX CPUs, GPUs); elsewhere it is
    emulated and slower than float32, so it runs with a warning."""
    if not folded_decoder.supports(decoder):
        raise ValueError(f"decoder_dtype {dtype} needs the float mask decoder, not a quantized one")
    device = next(decoder.parameters()).device
    if dtype == torch.bfloat16 and not bfloat16_is_native(device):
        warnings.warn(
            f"decoder_dtype bfloat16 on {device}, which has no native bfloat16 matmul (AVX512-BF16, AMX or a "
            "GPU): it will run slower than float32",
            stacklevel=3,
        )
    return copy.deepcopy(decoder).to(dtype)


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (oneDNN's own check also accepts plain AVX512, where it emulates)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: oneDNN's check, which may count emulation as support
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def _encode_rle(mask: np.ndarray) -> Dict[str, Any]:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def filters_per_window(device: torch.device) -> bool:
    """Where the full-resolution filters run per mask window (the CPU: each mask costs its object's
    size) rather than on chunks of whole masks (an accelerator: few large kernels). The same masks
    either way."""
    return device.type == "cpu"


def _encode_rles(masks: torch.Tensor, crop_box: List[int], orig_size: Tuple[int, int]) -> List[Dict[str, Any]]:
    """Compressed COCO RLEs of (k, h, w) crop masks placed in the full image. Masks on an
    accelerator are run-length coded where they are and only the run lengths cross to the host;
    on the CPU pycocotools encodes them directly. Same bytes either way."""
    if masks.device.type != "cpu":
        return _encode_rles_where_they_are(masks, crop_box, orig_size)
    return _encode_rles_with_pycocotools(masks, crop_box, orig_size)


def _encode_rles_where_they_are(
    masks: torch.Tensor, crop_box: List[int], orig_size: Tuple[int, int]
) -> List[Dict[str, Any]]:
    x0, y0, x1, y1 = crop_box
    h, w = orig_size
    if (x0, y0, x1, y1) != (0, 0, w, h):
        masks = torch.nn.functional.pad(masks, (x0, w - x1, y0, h - y1))
    return coco_rles_from_run_lengths(run_lengths(masks.bool()), h, w)


def _encode_rles_with_pycocotools(
    masks: torch.Tensor, crop_box: List[int], orig_size: Tuple[int, int]
) -> List[Dict[str, Any]]:
    x0, y0, x1, y1 = crop_box
    h, w = orig_size
    arr = masks.cpu().numpy().astype(np.uint8)
    if (x0, y0, x1, y1) != (0, 0, w, h):
        arr = np.pad(arr, ((0, 0), (y0, h - y1), (x0, w - x1)))
    # pycocotools wants (h, w, k) in Fortran order: one transpose for the whole chunk.
    return mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0)))
