"""The one image preprocessing path: every job and the predictor go through these functions.

SAM resizes the longest side to 1024 with PIL's bilinear filter (antialiased when shrinking),
normalises with ImageNet statistics in 0..255 units and zero-pads bottom/right to 1024x1024.
Matching PIL exactly is what makes stored embeddings equal the official predictor's.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Tuple

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it is used: decoding workers need only numpy and PIL
    import torch

from .modeling.pixels import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD, normalize_and_pad  # noqa: F401 (part of this API)


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int = IMAGE_SIZE) -> Tuple[int, int]:
    """(h, w) after resizing so the longest side is `long_side_length` (rounded half up)."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


def to_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Convert an image array to HxWx3 uint8 RGB, or raise a ValueError naming `name`.

    Accepts HxW or HxWx1 grayscale, HxWx3 RGB, HxWx4 RGBA (alpha dropped). uint8 is kept as is;
    floats in [0, 1] are scaled by 255; any other numeric type (16-bit microscopy, floats in other
    ranges) is stretched linearly from its own min..max to 0..255, since such data rarely spans
    its type's full range.
    """
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {tuple(image.shape)}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: empty image of shape {tuple(image.shape)}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"{name}: unsupported pixel type {image.dtype}")
    floating = np.issubdtype(image.dtype, np.floating)
    if floating and not np.isfinite(image).all():
        raise ValueError(f"{name}: image holds NaN or infinite values")
    lo, hi = float(image.min()), float(image.max())
    if floating and lo >= 0.0 and hi <= 1.0:
        offset, scale = 0.0, 255.0
    else:
        offset, scale = lo, (255.0 / (hi - lo) if hi > lo else 0.0)
    # Row blocks of float64: the same arithmetic as one whole-image copy, without that copy (a 16-bit
    # image near the pixel limit would need ~4 GB of float64).
    out = np.empty(image.shape, np.uint8)
    step = max(1, (1 << 22) // max(1, image.shape[1] * image.shape[2]))
    for r in range(0, image.shape[0], step):
        block = (image[r : r + step].astype(np.float64) - offset) * scale
        out[r : r + step] = np.clip(np.rint(block), 0, 255)
    return out


def resize_longest_side(image: np.ndarray, long_side_length: int = IMAGE_SIZE) -> np.ndarray:
    """Resize an HxWx3 uint8 image so its longest side is `long_side_length` (PIL bilinear)."""
    h, w = get_preprocess_shape(image.shape[0], image.shape[1], long_side_length)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the encoder, with the sizes needed to map prompts and masks back."""

    tensor: "torch.Tensor"  # (3, size, size) float32, normalised and padded
    original_size: Tuple[int, int]  # (H, W) of the input image
    input_size: Tuple[int, int]  # (h, w) after resizing, before padding


def prepare_image(image: np.ndarray, size: int = IMAGE_SIZE, name: str = "image") -> PreparedImage:
    """Convert, resize, normalise and pad one image: the CPU half of the encoder's work."""
    import torch

    rgb = to_rgb_uint8(image, name)
    resized = resize_longest_side(rgb, size)
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
    return PreparedImage(normalize_and_pad(x, size), (rgb.shape[0], rgb.shape[1]), tuple(resized.shape[:2]))


class ResizeLongestSide:
    """Maps images, points and boxes into the resized frame (the official class's interface)."""

    def __init__(self, target_length: int = IMAGE_SIZE) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return resize_longest_side(image, self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: "torch.Tensor", original_size: Tuple[int, ...]) -> "torch.Tensor":
        import torch

        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        coords = coords.to(torch.float32).clone()
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(self, boxes: "torch.Tensor", original_size: Tuple[int, ...]) -> "torch.Tensor":
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        return get_preprocess_shape(oldh, oldw, long_side_length)
