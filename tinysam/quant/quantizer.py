"""Uniform symmetric quantizers: one scale, or two scales for post-softmax and post-GELU inputs.

`x_q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1)`, as in the paper. Twin quantizers (PTQ4ViT)
split a tensor into two groups, each with its own scale, still one b-bit code per value:
- softmax (values in [0, 1], most of them tiny): values below 2^(b-1) * s_fine take the fine scale,
  the rest a coarse scale 1 / (2^(b-1) - 1) that reaches 1.0; codes 0 .. 2^(b-1) - 1 in each group.
- GELU (values >= -0.17, long positive tail): negative values take codes -2^(b-1) .. 0 with a
  scale fixed to cover GELU's minimum, positive values codes 0 .. 2^(b-1) - 1 with a searched scale.
The searched scale is `scale`; the fixed second scale follows from `bits` and the kind.
"""

import warnings
from typing import Optional

import torch

# PyTorch flags its quantized-tensor constructors as deprecated; they are still its fastest
# quantizers on CPU (see _qtensor), so the notice is silenced for these two only.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")

GELU_MIN = 0.17  # GELU's minimum is -0.16997 (at x = -0.7518)
TWIN_KINDS = ("", "softmax", "gelu")


def qrange(bits: int) -> int:
    """2^(b-1): codes run from -qrange to qrange - 1."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return 2 ** (bits - 1)


def max_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain max-scaling, the search's starting point and baseline: amax / 2^(b-1)."""
    return torch.clamp(amax, min=1e-8) / qrange(bits)


def second_scale(kind: str, bits: int) -> Optional[float]:
    """The fixed scale of a twin quantizer's other group (None for a single-scale quantizer)."""
    q = qrange(bits)
    if kind == "softmax":
        return 1.0 / (q - 1)
    if kind == "gelu":
        return GELU_MIN / q
    return None


def _along(scale: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """A per-channel scale shaped to broadcast along x's `axis` (a single scale unchanged)."""
    if scale.numel() == 1:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.view(shape)


def _qtensor(
    x: torch.Tensor, scale: torch.Tensor, axis: Optional[int], zero_point: int = 0, dtype: torch.dtype = torch.qint8
) -> torch.Tensor:
    """PyTorch's fused, vectorised quantizer (one pass; the elementwise round/clamp chain takes
    ~8x longer). Rounds half to even, as torch.round."""
    if scale.numel() == 1:
        return torch.quantize_per_tensor(x, float(scale), zero_point, dtype)
    zeros = torch.full((scale.numel(),), zero_point, dtype=torch.long)
    return torch.quantize_per_channel(x, scale.reshape(-1).double(), zeros, axis, dtype)


def _quantize_dense(
    x: torch.Tensor,
    scale: torch.Tensor,
    axis: Optional[int],
    zero_point: int = 0,
    dtype: torch.dtype = torch.qint8,
    dequantize: bool = True,
) -> torch.Tensor:
    """_qtensor on x's own memory order: a channels-last NCHW tensor is quantized as the NHWC
    tensor it is in memory (no transposing copy), and comes back channels-last. Under
    torch.compile, plain tensor ops instead (quantized tensors do not compile; Inductor fuses
    these into the op that made x)."""
    x = x.float()
    if dequantize and dtype == torch.qint8 and zero_point == 0 and torch.onnx.is_in_onnx_export():
        # ONNX export: fake-quantize ops, which export as QuantizeLinear/DequantizeLinear pairs
        # (per tensor, or per channel along `axis`); the same codes and values
        if scale.numel() == 1:
            return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, -128, 127)
        zeros = torch.zeros(scale.numel(), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1).float(), zeros, axis, -128, 127)
    if torch.compiler.is_compiling():
        view = _along(scale, x, axis)
        low, high = (0, 255) if dtype == torch.quint8 else (-128, 127)
        codes = torch.clamp(torch.round(x / view) + zero_point, low, high)
        if dequantize:
            return (codes - zero_point) * view
        return codes.to(torch.uint8 if dtype == torch.quint8 else torch.int8)
    if dequantize and scale.numel() > 1 and x.dim() == 4 and axis == 1 and zero_point == 0:
        # per-channel activations: scale to unit steps, one per-tensor pass, scale back (PyTorch's
        # per-channel quantizer is ~3x slower on activations this large)
        view = scale.view(1, -1, 1, 1)
        return _quantize_dense(x * (1.0 / view), torch.ones(1), None).mul_(view)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        nhwc_axis = {1: 3, 2: 1, 3: 2}.get(axis, axis) if axis is not None else None
        q = _qtensor(x.permute(0, 2, 3, 1), scale, nhwc_axis, zero_point, dtype)
        out = q.dequantize() if dequantize else q.int_repr()
        return out.permute(0, 3, 1, 2)
    q = _qtensor(x.contiguous(), scale, axis, zero_point, dtype)
    return q.dequantize() if dequantize else q.int_repr()


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    axis: Optional[int] = None,
    low: Optional[int] = None,
    high: Optional[int] = None,
) -> torch.Tensor:
    """Quantize and dequantize: one scale (scale.numel() == 1) or one per index of `axis`;
    codes limited to [low, high] (default: the full b-bit range)."""
    q = qrange(bits)
    low = -q if low is None else low
    high = q - 1 if high is None else high
    scale = torch.as_tensor(scale, dtype=torch.float32)
    out = _quantize_dense(x, scale, axis)  # codes in the 8-bit range
    if (low, high) == (-128, 127):
        return out
    # dequantized values are exact multiples of the scale: clipping them clips the codes
    if scale.numel() == 1 and not torch.compiler.is_compiling():  # float(): a graph break
        return out.clamp_(low * float(scale), high * float(scale))
    view = _along(scale, x, axis)
    return out.clamp_(low * view, high * view)


def quant_codes(
    x: torch.Tensor,
    scale: float,
    bits: int,
    low: Optional[int] = None,
    high: Optional[int] = None,
    unsigned: bool = False,
) -> torch.Tensor:
    """int8 codes of x at one scale (the int8 kernels' input), limited to [low, high]; with
    `unsigned`, uint8 codes + 128 (oneDNN's convolution input)."""
    q = qrange(bits)
    low = -q if low is None else low
    high = q - 1 if high is None else high
    scale_t = torch.tensor([scale], dtype=torch.float32)
    if unsigned:
        codes = _quantize_dense(x, scale_t, None, 128, torch.quint8, dequantize=False)
        return codes if (low, high) == (-128, 127) else codes.clamp_(low + 128, high + 128)
    codes = _quantize_dense(x, scale_t, None, dequantize=False)
    return codes if (low, high) == (-128, 127) else codes.clamp_(low, high)


def twin_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, kind: str, bits: int, axis: Optional[int] = None
) -> torch.Tensor:
    """Quantize and dequantize with two scales, split into two groups by `kind` (see module doc)."""
    if not kind:
        return fake_quant(x, scale, bits, axis)
    q = qrange(bits)
    other = torch.tensor([second_scale(kind, bits)])
    if kind == "softmax":
        fine = fake_quant(x, scale, bits, axis, low=0)
        coarse = fake_quant(x, other, bits, low=0)
        return torch.where(x < (q - 0.5) * _along(scale, x, axis), fine, coarse)
    if kind == "gelu":
        return fake_quant(x, scale, bits, axis, low=0).add_(fake_quant(x, other, bits, high=0))
    raise ValueError(f"unknown twin kind {kind!r}; known: {TWIN_KINDS}")
