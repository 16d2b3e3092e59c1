"""SamPredictor behaviour beyond parity: conversions, stored embeddings, clear errors."""

import numpy as np
import pytest
import torch

from tinysam import SamPredictor


def test_grayscale_and_sixteen_bit_images_are_accepted(vit_t, nuclei):
    image16, _ = nuclei
    predictor = SamPredictor(vit_t)
    predictor.set_image(image16)  # 512x512 uint16, one channel
    emb16 = predictor.get_image_embedding().clone()
    assert predictor.original_size == (512, 512) and predictor.input_size == (1024, 1024)
    lo, hi = int(image16.min()), int(image16.max())
    stretched = np.rint((image16.astype(np.float64) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    predictor.set_image(np.dstack([stretched] * 3))
    assert torch.equal(predictor.get_image_embedding(), emb16)


def test_bgr_input_is_flipped_to_rgb(vit_t, astronaut):
    predictor = SamPredictor(vit_t)
    small = astronaut[::4, ::4]
    predictor.set_image(small)
    rgb = predictor.get_image_embedding().clone()
    predictor.set_image(np.ascontiguousarray(small[..., ::-1]), image_format="BGR")
    assert torch.equal(predictor.get_image_embedding(), rgb)


def test_stored_embedding_gives_the_same_masks_as_the_image(vit_t, astronaut):
    predictor = SamPredictor(vit_t)
    predictor.set_image(astronaut)
    emb = predictor.get_image_embedding().clone()
    box = np.array([100, 50, 400, 480])
    direct = predictor.predict(box=box)
    stored = SamPredictor(vit_t)
    stored.set_embedding(emb.half()[0], astronaut.shape[:2])  # as read back from fp16 Parquet
    again = stored.predict(box=box)
    assert stored.input_size == predictor.input_size
    assert np.abs(again[2] - direct[2]).max() < 0.1  # fp16 rounding of the embedding only
    for a, b in zip(again[0], direct[0]):
        assert np.logical_and(a, b).sum() / np.logical_or(a, b).sum() > 0.99


def test_fast_decoder_equals_the_official_operation_order(vit_t, astronaut):
    """The default (the folded decoder) against fast_decoder=False, the official operation order:
    the same logits up to fp32 rounding."""
    fast = SamPredictor(vit_t)
    fast.set_image(astronaut)
    plain = SamPredictor(vit_t, fast_decoder=False)
    plain.set_embedding(fast.get_image_embedding(), astronaut.shape[:2])
    boxes = np.array([[100, 50, 400, 480], [200, 100, 260, 300], [0, 0, 511, 511]])
    points = dict(point_coords=np.array([[[250, 200], [300, 400]]] * 2), point_labels=np.array([[1, 0], [1, 1]]))
    for kwargs in (dict(box=boxes), dict(box=boxes, multimask_output=False), points):
        a, b = fast.predict(**kwargs, return_logits=True), plain.predict(**kwargs, return_logits=True)
        a_masks, b_masks = fast.predict(**kwargs), plain.predict(**kwargs)
        assert not np.array_equal(a[2], b[2])  # another operation order
        assert np.abs(a[2] - b[2]).max() <= 1e-5 * np.abs(b[2]).max()
        assert np.abs(a[1] - b[1]).max() <= 1e-5
        assert np.abs(a[0] - b[0]).max() <= 1e-5 * np.abs(b[0]).max()
        assert (a_masks[0] != b_masks[0]).mean() < 1e-4  # a pixel may flip where a logit is ~0
    # with a mask input per prompt (iterative point prompting): the image once per prompt
    low = a[2][:, :1]
    a, b = (p.predict(**points, mask_input=low, multimask_output=False, return_logits=True) for p in (fast, plain))
    assert not np.array_equal(a[2], b[2]) and np.abs(a[2] - b[2]).max() <= 1e-5 * np.abs(b[2]).max()


def test_return_logits_and_single_mask_shapes(vit_t, astronaut):
    predictor = SamPredictor(vit_t)
    predictor.set_image(astronaut)
    logits, iou, low = predictor.predict(
        point_coords=np.array([[250, 200]]), point_labels=np.array([1]), multimask_output=False, return_logits=True
    )
    assert logits.dtype == np.float32 and logits.shape == (1, 512, 512)
    assert iou.shape == (1,) and low.shape == (1, 256, 256)
    masks, _, _ = predictor.predict(
        point_coords=np.array([[250, 200]]), point_labels=np.array([1]), multimask_output=False
    )
    assert np.array_equal(masks, logits > 0.0)


def test_errors_name_the_problem(vit_t):
    predictor = SamPredictor(vit_t)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([0, 0, 10, 10]))
    predictor.set_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="point_labels must be given"):
        predictor.predict(point_coords=np.array([[1, 1]]))
    with pytest.raises(ValueError, match=r"do not match"):
        predictor.predict(point_coords=np.array([[1, 1], [2, 2]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="image_format"):
        predictor.set_image(np.zeros((8, 8, 3), np.uint8), image_format="HSV")
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 5\)"):
        predictor.set_image(np.zeros((8, 8, 5), np.uint8))
