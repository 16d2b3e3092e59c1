"""SAM's ViT image encoder (vit_b / vit_l / vit_h): windowed attention with decomposed relative
positions, a few global blocks, and a conv neck down to 256 channels.

Parameter names follow the official segment-anything code, so its checkpoints load unchanged.
"""

from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock, biased_attention


class ImageEncoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        global_attn_indexes: Tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1024, 1024) normalised images -> (B, 256, 64, 64) embeddings."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


class Block(nn.Module):
    """Pre-norm transformer block; windowed when `window_size > 0`, global otherwise."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        norm_layer: Type[nn.Module],
        act_layer: Type[nn.Module],
        use_rel_pos: bool,
        window_size: int,
        input_size: Tuple[int, int],
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


ATTENTION_IMPLS = ("auto", "explicit", "fused")


class Attention(nn.Module):
    """Multi-head attention over a (B, H, W, C) grid with decomposed relative position bias.

    `impl`: "explicit" builds the (heads, q, k) bias and runs the biased attention (fastest on the
    CPU); "fused" runs FlexAttention with the two bias terms as a `score_mod`, so neither the score
    nor the bias matrix is materialised (compiled once per shape on CUDA); "auto" (default) is
    fused on CUDA, explicit elsewhere. Same numbers either way (tested).
    """

    impl: str = "auto"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need the input size")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, HW, d)
        if self.use_rel_pos and self._fused(q):
            x = fused_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w))
        elif self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            x = biased_attention(q, k, v, bias)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(x)

    def _fused(self, q: torch.Tensor) -> bool:
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {self.impl!r}")
        return self.impl == "fused" or (self.impl == "auto" and q.is_cuda)


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Choose how every relative-position attention of `model` runs (see `Attention`)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    for module in model.modules():
        if isinstance(module, Attention):
            module.impl = impl
    return model


_flex_attention: Optional[Callable] = None
FLEX_COMPILE_DYNAMIC: Optional[bool] = False  # torch.compile's `dynamic` for the fused attention


def fused_rel_pos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size
) -> torch.Tensor:
    """Attention with the decomposed relative position bias added inside FlexAttention: the bias
    terms are (B, heads, q, H) and (B, heads, q, W) tables, read per score as
    `rel_h[q, k // W] + rel_w[q, k % W]`, so memory grows with q * (H + W), not q * H * W."""
    global _flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    h, w = size
    b, heads = q.shape[:2]
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size, size)
    rel_h, rel_w = rel_h.reshape(b, heads, h * w, h), rel_w.reshape(b, heads, h * w, w)

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score + rel_h[batch, head, q_idx, kv_idx // w] + rel_w[batch, head, q_idx, kv_idx % w]

    if q.is_cuda:  # eager FlexAttention is a reference implementation: compile once, per shape
        _flex_attention = _flex_attention or torch.compile(flex_attention, dynamic=FLEX_COMPILE_DYNAMIC)
        return _flex_attention(q, k, v, score_mod=score_mod)
    return flex_attention(q, k, v, score_mod=score_mod)


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, ws, ws, C), zero-padding H and W up to multiples of ws."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`, dropping the padding."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) offset along one axis: (q, k, C)."""
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = rel_pos.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_size: Tuple[int, int], k_size: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two terms of MViTv2's decomposed relative position bias: (B, heads, q_h, q_w, k_h) and
    (B, heads, q_h, q_w, k_w). From the unscaled queries, as the official code (it adds the bias
    after scaling q.k)."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    b, heads, _, dim = q.shape
    r_q = q.reshape(b, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(q_h, k_h, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(q_w, k_w, rel_pos_w))
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> torch.Tensor:
    """The decomposed relative position bias as an additive attention mask (B, heads, q, k)."""
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    b, heads = q.shape[:2]
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(b, heads, q_size[0] * q_size[1], k_size[0] * k_size[1])


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, returning channels-last (B, H, W, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
