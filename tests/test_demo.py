"""The predictor demo writes overlays and COCO RLE masks that decode to the image size."""

import json

import numpy as np
from PIL import Image

from tinysam.utils.rle import coco_rle_to_mask
from tinysam_samples.predictor_demo import run_predictor_demo


def test_demo_writes_overlays_and_decodable_masks(tmp_path, mobile_sam_path, photos):
    summary = run_predictor_demo(tmp_path, checkpoint=str(mobile_sam_path), images=("astronaut", "coffee"))
    assert summary["images"] == 2 and summary["masks"] == 5
    records = json.loads((tmp_path / "masks.json").read_text())
    for record in records:
        h, w = record["image"]["height"], record["image"]["width"]
        assert photos[record["image"]["file_name"]].shape[:2] == (h, w)
        png = np.asarray(Image.open(tmp_path / f"{record['image']['file_name']}_overlay.png"))
        assert png.shape == (h, w, 3)
        for ann in record["annotations"]:
            mask = coco_rle_to_mask(ann["segmentation"])
            assert mask.shape == (h, w)
            assert mask.sum() == ann["area"] > 100
            assert 0.5 < ann["predicted_iou"] <= 1.2
