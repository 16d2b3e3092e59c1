"""COCO polygons of masks (tinysam/utils/polygons.py), judged by pycocotools: the polygons filled
again by its rasteriser against the mask they came from."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tinysam import SamAutomaticMaskGenerator
from tinysam.utils.polygons import PolygonRules, mask_to_polygons, rle_to_polygons
from tinysam.utils.rle import mask_to_coco_rle


def filled(polygons, h: int, w: int) -> np.ndarray:
    if not polygons:
        return np.zeros((h, w), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_polygons_fill_back_to_real_masks(vit_t, photos):
    """vit_t's everything-mode masks of the sample photos, as polygons and filled again: mean IoU
    with the masks >= 0.975 on every photo at the default tolerance (measured 0.986-0.988; without
    the half-pixel move to the pixels' outer edges 0.960-0.969, without the keyholes 0.87 on
    coffee)."""
    generator = SamAutomaticMaskGenerator(vit_t, points_per_side=8)
    for name, image in photos.items():
        h, w = image.shape[:2]
        records = generator.generate(image)
        scores = [
            iou(filled(rle_to_polygons(mask_to_coco_rle(r["segmentation"])), h, w), r["segmentation"]) for r in records
        ]
        print(f"{name}: {len(scores)} masks as polygons: mean IoU {np.mean(scores):.4f}, worst {min(scores):.4f}")
        assert len(scores) >= 3 and np.mean(scores) >= 0.975, (name, scores)


def ring(h: int = 60, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 30, xx - 40)
    return (r < 25) & (r >= 10)


def test_a_hole_is_cut_out_by_a_keyhole_or_filled_on_request():
    mask = ring()
    kept = mask_to_polygons(mask)
    assert len(kept) == 1  # one outer contour: one polygon, its hole joined by a cut
    assert iou(filled(kept, *mask.shape), mask) >= 0.97
    assert not filled(kept, *mask.shape)[30, 40]  # the hole's centre stays empty
    no_holes = mask_to_polygons(mask, PolygonRules(keep_holes=False))
    assert filled(no_holes, *mask.shape)[30, 40]  # filled: the outer disc
    assert iou(filled(no_holes, *mask.shape), np.hypot(*np.mgrid[-30:30, -40:40]) < 25) >= 0.97


def test_pieces_below_the_minimum_area_are_dropped_and_each_piece_is_a_polygon():
    mask = np.zeros((50, 50), bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[30:45, 30:45] = True  # 225 px
    mask[2:5, 40:43] = True  # 9 px: dropped at the default 16
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2 and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    assert len(mask_to_polygons(mask, PolygonRules(min_area=0))) == 3
    assert iou(filled(polygons, 50, 50), mask) >= 0.98  # squares survive the simplification whole
    assert mask_to_polygons(np.zeros((8, 8), bool)) == []
    with pytest.raises(ValueError, match="tolerance"):
        PolygonRules(tolerance=-1)
