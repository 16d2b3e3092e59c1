"""Real-data checks: the BBBC038 ground truth is what we think it is; random weights do not segment it
(the real weights' box-prompt mIoU >= 0.75 is asserted by tests/test_eval.py)."""

import numpy as np

from tinysam import SamPredictor, build_sam
from tinysam.eval import box_prompt_image
from tinysam.sample_data import instance_masks
from tinysam.utils.rle import mask_bbox_xywh

from .conftest import randomize_


def test_bbbc038_has_125_ground_truth_nuclei(nuclei):
    image, labels = nuclei
    assert image.shape == labels.shape == (512, 512)
    assert len(list(instance_masks(labels))) == 125


def test_random_weights_stay_far_below(nuclei):
    image, labels = nuclei
    predictor = SamPredictor(randomize_(build_sam("vit_t"), seed=3).eval())
    predictor.set_image(image)
    gts = list(instance_masks(labels))
    out = box_prompt_image(predictor, 1, [mask_bbox_xywh(g) for g in gts], gt_masks=gts)
    miou = float(np.mean(out["ious"]))
    print(f"BBBC038 box-prompt mIoU, random weights: {miou:.4f}")
    assert miou < 0.4
