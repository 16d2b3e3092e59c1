"""Small building blocks shared by the encoders and the decoder."""

from typing import Callable, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (SAM's neck and upscaler).

    NCHW-contiguous input takes the official two-pass formula, whose rounding the parity tests
    track to 1e-4. Channels-last input (the decoder's fast upscaling) takes PyTorch's fused
    layer_norm over the contiguous channel axis: several times faster, equally accurate against
    float64, but rounded differently.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation in between (ViT / two-way transformer MLP)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (decoder hypernetworks and IoU head)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Optional[Callable[..., torch.Tensor]] = None
) -> torch.Tensor:
    """Scaled dot-product attention on (B, heads, N, d) tensors, through PyTorch's fused kernel
    (or `attend(q, k, v)`, e.g. the quantized explicit form).

    Keys and values may have a smaller batch n than the queries' B (n divides B): query b then
    uses key batch b // (B / n). This is how the decoder shares an image's tokens among all of
    its prompts: each group of queries is folded into the token axis, so the shared keys are
    projected and stored once per image instead of once per prompt.
    """
    attend = attend or F.scaled_dot_product_attention
    n, b = k.shape[0], q.shape[0]
    if n == b:
        return attend(q, k, v)
    if b % n:
        raise ValueError(f"query batch {b} is not a multiple of key batch {n}")
    _, h, t, d = q.shape
    g = b // n
    q_folded = q.view(n, g, h, t, d).transpose(1, 2).reshape(n, h, g * t, d)
    out = attend(q_folded, k, v)
    return out.view(n, h, g, t, -1).transpose(1, 2).reshape(b, h, t, -1)


def expand_groups(x: torch.Tensor, batch: int) -> torch.Tensor:
    """View an (n, ...) per-image tensor as (batch, ...) with each row repeated batch / n times."""
    n = x.shape[0]
    if n == batch:
        return x
    return x.unsqueeze(1).expand(n, batch // n, *x.shape[1:]).reshape(batch, *x.shape[1:])


def add_groups(shared: torch.Tensor, per_item: torch.Tensor) -> torch.Tensor:
    """shared (n, ...) + per_item (B, ...), item b paired with shared row b // (B / n), no copy of shared."""
    n, b = shared.shape[0], per_item.shape[0]
    if n == b:
        return shared + per_item
    return (per_item.view(n, b // n, *per_item.shape[1:]) + shared.unsqueeze(1)).view(per_item.shape)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q.k^T / sqrt(d) + bias) v, written out.

    PyTorch's CPU SDPA with a float mask runs extra full-size checks for fully masked rows;
    an additive bias never masks, so the explicit form is faster and computes the same thing.
    """
    attn = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    attn = attn.add_(bias).softmax(dim=-1)
    return torch.matmul(attn, v)


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    score: Callable = torch.matmul,
    value: Callable = torch.matmul,
) -> torch.Tensor:
    """softmax(q.k^T / sqrt(d) [+ bias]) v with its two matmuls replaceable (quantized attention)."""
    attn = score(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if bias is not None:
        attn = attn + bias  # not in place: calibration hooks the scores' gradient
    return value(attn.softmax(dim=-1), v)
