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


def test_run_lengths_on_the_device_path_equal_pycocotools_byte_for_byte(rng):
    """The device-side RLE (diff and nonzero on a torch tensor; here a CPU one) gives pycocotools'
    own compressed strings: random masks, empty and full ones, and crop masks placed in an image."""
    import torch

    from tinysam.everything.generator import _encode_rles_where_they_are, _encode_rles_with_pycocotools
    from tinysam.utils.rle import coco_rles_from_run_lengths, run_lengths

    masks = rng.random((6, 37, 53)) > 0.5
    masks[1] = True
    masks[2] = False
    masks[3, 0, 0] = True
    masks[4] = rng.random((37, 53)) > 0.99  # sparse
    expected = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    got = coco_rles_from_run_lengths(run_lengths(torch.from_numpy(masks)), 37, 53)
    assert [(r["size"], r["counts"]) for r in got] == [(list(r["size"]), r["counts"]) for r in expected]
    crop = [10, 5, 63, 42]  # x0, y0, x1, y1 of a 37x53 crop in a 50x70 image
    host = _encode_rles_with_pycocotools(torch.from_numpy(masks), crop, (50, 70))
    device = _encode_rles_where_they_are(torch.from_numpy(masks), crop, (50, 70))
    assert [r["counts"] for r in device] == [r["counts"] for r in host]
    assert coco_rle_to_mask(device[0])[5:42, 10:63].tolist() == masks[0].tolist()


def test_a_window_placed_in_an_image_gives_pycocotools_bytes(rng):
    """`window_run_lengths`: the RLE of a mask that is 0 outside a window, from the window alone,
    byte for byte pycocotools' encoding of the whole mask: windows anywhere (touching each edge,
    full height, where a run goes on from one column into the next), empty, full and sparse."""
    from tinysam.utils.rle import coco_rles_from_run_lengths, window_run_lengths

    # (window, top, left, image h, image w)
    cases = [(np.ones((9, 3), bool), 0, 2, 9, 11), (np.zeros((0, 0), bool), 0, 0, 9, 11)]
    cases += [(np.ones((1, 1), bool), 8, 10, 9, 11), (np.ones((9, 11), bool), 0, 0, 9, 11)]
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        size = (int(rng.integers(0, h - top + 1)), int(rng.integers(0, w - left + 1)))
        cases.append((rng.random(size) < rng.random(), top, left, h, w))
    for window, top, left, h, w in cases:
        mask = np.zeros((h, w), np.uint8)
        mask[top : top + window.shape[0], left : left + window.shape[1]] = window
        expected = mask_utils.encode(np.asfortranarray(mask))
        got = coco_rles_from_run_lengths([window_run_lengths(window, top, left, h, w)], h, w)[0]
        assert got["counts"] == expected["counts"], (window, top, left, h, w)
