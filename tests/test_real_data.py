"""Real-data checks: real weights segment real nuclei; random weights do not."""

import numpy as np

from tinysam import SamPredictor, build_sam
from tinysam.sample_data import instance_masks

from .conftest import randomize_


def box_prompt_miou(model, image, labels) -> float:
    """Mean IoU of one box-prompted mask per ground-truth instance (best predicted IoU of 3)."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    gts = list(instance_masks(labels))
    boxes = []
    for gt in gts:
        ys, xs = np.nonzero(gt)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    masks, iou, _ = predictor.predict(box=np.array(boxes, dtype=float), multimask_output=True)
    best = masks[np.arange(len(gts)), iou.argmax(axis=1)]
    ious = [np.logical_and(m, g).sum() / np.logical_or(m, g).sum() for m, g in zip(best, gts)]
    return float(np.mean(ious))


def test_bbbc038_has_125_ground_truth_nuclei(nuclei):
    image, labels = nuclei
    assert image.shape == labels.shape == (512, 512)
    assert len(list(instance_masks(labels))) == 125


def test_real_mobile_sam_segments_nuclei_from_boxes(vit_t, nuclei):
    miou = box_prompt_miou(vit_t, *nuclei)
    print(f"BBBC038 box-prompt mIoU, real mobile_sam.pt: {miou:.4f}")
    assert miou >= 0.75


def test_random_weights_stay_far_below(nuclei):
    model = randomize_(build_sam("vit_t"), seed=3).eval()
    miou = box_prompt_miou(model, *nuclei)
    print(f"BBBC038 box-prompt mIoU, random weights: {miou:.4f}")
    assert miou < 0.4
