"""Zero-shot instance segmentation from box prompts (the paper's Table 1, SAM's protocol).

Each box (a detector's, e.g. ViTDet-H, or the ground truth's) prompts one mask: multimask
output, the candidate with the highest predicted IoU kept. The masks are written as COCO results
and scored by pycocotools' segm evaluation (AP, AP50, AP75, AP_S, AP_M, AP_L).
"""

import contextlib
import io
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..predictor import SamPredictor
from ..utils.rle import mask_bbox_xywh, mask_to_coco_rle

STAT_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")


def box_prompt_image(
    predictor: SamPredictor,
    image_id: int,
    boxes_xywh: Sequence[Sequence[float]],
    scores: Optional[Sequence[float]] = None,
    category_ids: Optional[Sequence[int]] = None,
    gt_masks: Optional[Sequence[np.ndarray]] = None,
    chunk: int = 64,
) -> Dict[str, Any]:
    """COCO results for the boxes of one image (the predictor's image must be set).

    The score of each result is the detection's score times the mask's predicted IoU (the
    predicted IoU alone for ground-truth boxes). With `gt_masks` aligned to the boxes (ground-
    truth prompts), also each mask's IoU with its own ground truth.
    """
    results: List[Dict[str, Any]] = []
    ious: List[float] = []
    boxes = np.asarray(boxes_xywh, dtype=float).reshape(-1, 4)
    for start in range(0, len(boxes), chunk):
        part = boxes[start : start + chunk]
        xyxy = np.concatenate([part[:, :2], part[:, :2] + part[:, 2:]], axis=1)
        masks, iou, _ = predictor.predict(box=xyxy.reshape(-1, 4) if len(xyxy) > 1 else xyxy[0], multimask_output=True)
        if len(xyxy) == 1:
            masks, iou = masks[None], iou[None]
        best = iou.argmax(axis=1)
        for k in range(len(part)):
            i = start + k
            mask = masks[k, best[k]]
            score = float(iou[k, best[k]]) * (float(scores[i]) if scores is not None else 1.0)
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[i]) if category_ids else 1,
                    "segmentation": mask_to_coco_rle(mask),
                    "score": score,
                }
            )
            if gt_masks is not None:
                gt = gt_masks[i]
                union = np.logical_or(mask, gt).sum()
                ious.append(float(np.logical_and(mask, gt).sum() / union) if union else 1.0)
    return {"results": results, "ious": ious}


def coco_segm_stats(
    coco_gt, results: List[Dict[str, Any]], max_dets: int = 100, image_ids: Optional[Sequence[int]] = None
) -> Dict[str, float]:
    """pycocotools segm AP of `results` against the ground truth (-1 where an area range is empty).

    Read from the accumulated precision at `max_dets` detections per image: pycocotools'
    `summarize` reports AP at 100 whatever `maxDets` says (LVIS uses 300, crowded images more).
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds fields (area, bbox, id) to the dicts it is given: give it copies
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "segm")
        evaluator.params.maxDets = [1, 10, max_dets]
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # (iou thresholds, recall, categories, areas, max dets)

    def ap(iou_index=None, area_index=0) -> float:
        p = precision[:, :, :, area_index, 2] if iou_index is None else precision[iou_index, :, :, area_index, 2]
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0

    return {"AP": ap(), "AP50": ap(0), "AP75": ap(5), "AP_S": ap(None, 1), "AP_M": ap(None, 2), "AP_L": ap(None, 3)}


def box_prompt_miou(
    predictor: SamPredictor, image: np.ndarray, gt_masks: Sequence[np.ndarray], chunk: int = 64
) -> float:
    """Mean IoU of the masks that each ground-truth box prompts (multimask, the best predicted IoU
    kept) with their own ground truth: box_prompt_image's protocol without the COCO results, and
    only the chosen mask upsampled (fast enough to compare many model variants)."""
    import torch

    predictor.set_image(image)
    gts = torch.from_numpy(np.stack([np.asarray(g, dtype=bool) for g in gt_masks]))
    xywh = np.array([mask_bbox_xywh(g) for g in gts.numpy()], dtype=float)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes = torch.from_numpy(predictor.transform.apply_boxes(xyxy, image.shape[:2])).float()
    masks = []
    with torch.no_grad():
        for part in boxes.split(chunk):
            _, iou, low_res = predictor.predict_torch(None, None, boxes=part, return_logits=True)
            best = low_res[torch.arange(len(part)), iou.argmax(1)][:, None]
            up = predictor.model.postprocess_masks(best, predictor.input_size, predictor.original_size)
            masks.append(up[:, 0] > predictor.model.mask_threshold)
    pred = torch.cat(masks)
    inter = (pred & gts).flatten(1).sum(1)
    union = (pred | gts).flatten(1).sum(1)
    return float((inter / union.clamp(min=1)).mean())
