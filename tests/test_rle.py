"""Mask encodings agree with pycocotools."""

import numpy as np
from pycocotools import mask as mask_utils

from tinysam.utils.rle import coco_rle_to_mask, mask_bbox_xywh, mask_to_coco_rle, mask_to_uncompressed_rle


def test_coco_and_uncompressed_rle_round_trip(rng):
    for _ in range(5):
        mask = rng.random((37, 53)) > 0.6
        mask[0, 0] = bool(rng.integers(0, 2))
        assert np.array_equal(coco_rle_to_mask(mask_to_coco_rle(mask)), mask)
        rle = mask_to_uncompressed_rle(mask)
        assert sum(rle["counts"]) == mask.size
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *rle["size"])).astype(bool)
        assert np.array_equal(decoded, mask)


def test_bbox_is_tight_xywh():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    assert mask_bbox_xywh(mask) == [3, 2, 6, 3]
    assert mask_bbox_xywh(np.zeros((4, 4), bool)) == [0, 0, 0, 0]
