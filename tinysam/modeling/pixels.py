"""What the models expect of their input pixels: SAM's normalisation and its square input size.
Module level imports nothing heavy: torch-free data workers read these constants."""

from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    import torch

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
IMAGE_SIZE = 1024


def normalize_and_pad(
    x: "torch.Tensor",
    size: int = IMAGE_SIZE,
    mean: Union[Sequence[float], "torch.Tensor"] = PIXEL_MEAN,
    std: Union[Sequence[float], "torch.Tensor"] = PIXEL_STD,
) -> "torch.Tensor":
    """(..., 3, h, w) 0..255 pixels -> normalised and zero-padded (..., 3, size, size) floats."""
    import torch
    import torch.nn.functional as F

    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    x = (x.to(torch.float32) - mean_t) / std_t
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h))
