"""The one preprocessing path: input conversions, resizing and normalisation."""

import numpy as np
import pytest
import torch

from tinysam.transforms import (
    IMAGE_SIZE,
    get_preprocess_shape,
    prepare_image,
    resize_longest_side,
    to_rgb_uint8,
)

from .helpers import import_official


def test_grayscale_rgba_and_single_channel_become_rgb(rng):
    gray = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (40, 30, 3) and rgb.dtype == np.uint8
    assert all(np.array_equal(rgb[..., c], gray) for c in range(3))
    assert np.array_equal(to_rgb_uint8(gray[..., None]), rgb)
    rgba = np.dstack([rgb, np.full((40, 30), 7, np.uint8)])
    assert np.array_equal(to_rgb_uint8(rgba), rgb)


def test_sixteen_bit_and_float_images_are_scaled_to_uint8():
    img16 = np.array([[1000, 3000], [5000, 9000]], dtype=np.uint16)
    out = to_rgb_uint8(img16)[..., 0]
    assert out.tolist() == [[0, 64], [128, 255]]  # min..max stretched to 0..255
    floats = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    assert to_rgb_uint8(floats)[..., 0].tolist() == [[0, 128], [255, 64]]
    assert to_rgb_uint8(np.full((3, 3), 700, np.uint16)).max() == 0  # constant image: no division by zero


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 2), np.uint8), r"photo\.png: expected an HxW.*got shape \(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"got shape \(2, 4, 4, 3\)"),
        (np.zeros((0, 4, 3), np.uint8), r"empty image"),
        (np.zeros((4, 4), bool), r"unsupported pixel type bool"),
        (np.array([["a", "b"]]), r"unsupported pixel type"),
        (np.array([[0.0, np.nan]]), r"NaN or infinite"),
    ],
)
def test_unsupported_images_raise_errors_naming_the_input(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_uint8(bad, name="photo.png")


def test_resize_matches_official_transform_exactly(photos):
    segment_anything = import_official("segment_anything")
    official = segment_anything.utils.transforms.ResizeLongestSide(IMAGE_SIZE)
    for image in photos.values():
        assert np.array_equal(resize_longest_side(image), official.apply_image(image))
    assert get_preprocess_shape(375, 500) == (768, 1024)
    assert get_preprocess_shape(1, 3) == (341, 1024)  # rounds half up, like the official code


def test_prepare_image_normalises_pads_and_records_sizes(astronaut):
    image = astronaut[:300, :512]
    prepared = prepare_image(image)
    assert prepared.tensor.shape == (3, 1024, 1024) and prepared.tensor.dtype == torch.float32
    assert prepared.original_size == (300, 512) and prepared.input_size == (600, 1024)
    assert torch.count_nonzero(prepared.tensor[:, 600:, :]) == 0  # zero padding below
    pixel = torch.tensor(resize_longest_side(image)[10, 20], dtype=torch.float32)
    expected = (pixel - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(prepared.tensor[:, 10, 20], expected)
