"""The mask decoder with its image-side attention algebra folded onto the prompt side.

Everything mode decodes ~1000 single-point prompts per image; each prompt carries its own copy of
the 4096 image tokens through the two-way transformer and the upscaler. In the plain decoder most
of that time is memory traffic over those (B, 4096, 256) tensors: k/v/q projections to 128
channels, head reshapes, attention with 7 keys, out projections. The same function can be computed
with the projections moved to the few prompt tokens:

- token -> image attention: q_h k_h^T = (q_h W_k,h) (x + pe)^T plus a per-row constant that the
  softmax ignores, and softmax(.) v_h = (softmax(.) x) W_v,h^T + b_v,h because each softmax row sums
  to 1. The image tokens are read by two (heads x tokens = 56)-row matmuls, never projected.
- image -> token attention: the scores are (x + pe) (W_q,h^T k_h^T) + b_q,h k_h^T, a 56-column
  matmul, and the output sum_h A_h (v_h W_o,h^T) + b_o is one more, accumulated into the residual.
- the upscaler's 2x2 stride-2 transposed convolutions are per-pixel linear maps: computed as plain
  matmuls with the LayerNorm and GELU on the sub-pixel layout, and only the requested masks are
  shuffled into image order at the end.

Same weights, no copies of them; results equal the plain decoder's up to fp32 rounding (checked in
tests/test_modeling.py). Covers point/box prompts with a mask-free, per-image or per-prompt (mask
input) dense embedding, and float `nn.Linear` layers (not the quantized ones: `fast_decoder`
gives those the plain decoder's channels-last upscaling).
"""

import functools
from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import LayerNorm2d, add_groups
from .mask_decoder import MaskDecoder
from .transformer import Attention, CrossAttention


def supports(decoder: MaskDecoder) -> bool:
    """Whether `decoder` is the float decoder this folding assumes (not a quantized one)."""
    attentions = [m for m in decoder.modules() if isinstance(m, Attention)]
    up = list(decoder.output_upscaling)
    return (
        all(type(m) is nn.Linear for a in attentions for m in (a.q_proj, a.k_proj, a.v_proj, a.out_proj))
        and all(a.matmuls is None for a in attentions)
        and len(up) == 5
        and all(
            type(up[i]) is nn.ConvTranspose2d
            and up[i].kernel_size == (2, 2)
            and up[i].stride == (2, 2)
            and up[i].padding == (0, 0)
            and up[i].output_padding == (0, 0)
            and up[i].groups == 1
            for i in (0, 3)
        )
        and type(up[1]) is LayerNorm2d
    )


def fast_decoder(decoder: MaskDecoder) -> Callable[..., Tuple[Tensor, Tensor]]:
    """The fastest path for `decoder` with `MaskDecoder.forward`'s positional arguments (everything
    mode's and the predictor's default): folded for a float decoder, channels-last upscaling for a
    quantized one."""
    return FoldedMaskDecoder(decoder) if supports(decoder) else partial(decoder, fast_upscaling=True)


class FoldedMaskDecoder:
    """Runs a float `MaskDecoder`'s forward (point and box prompts, with or without mask inputs)
    with the folded algebra above."""

    def __init__(self, decoder: MaskDecoder) -> None:
        if not supports(decoder):
            raise ValueError("the folded decoder needs the float MaskDecoder (plain Linear layers, 2x2 upscaler)")
        self.decoder = decoder

    def __call__(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> Tuple[Tensor, Tensor]:
        """Arguments and results as `MaskDecoder.forward`. A per-prompt dense embedding (mask
        inputs) gives each prompt its own image tokens, as in the plain decoder."""
        d = self.decoder
        b, n = sparse_prompt_embeddings.shape[0], image_embeddings.shape[0]
        if n == 0 or b % n:
            raise ValueError(f"{b} prompts cannot be split evenly among {n} image embeddings")
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        # a fresh tensor either way: the folded attention may update it in place
        src = image_embeddings + dense if dense.shape[0] in (1, n) else add_groups(image_embeddings, dense)
        hs, x = d.transformer(src, image_pe, tokens, cross=FoldedCrossAttention())

        sel = list(range(1, d.num_mask_tokens)) if multimask_output else [0]
        hyper = torch.stack([d.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in sel], dim=1)
        h, w = image_embeddings.shape[-2:]
        masks = _upscaled_masks(d.output_upscaling, x, hyper, h, w)
        iou = d.iou_prediction_head(hs[:, 0])[:, sel]
        return masks, iou


def _grouped_bmm(a: Tensor, b: Tensor) -> Tensor:
    """a (B, m, k) @ b (n, k, p) with b shared by groups of B / n rows of a."""
    bsz, n = a.shape[0], b.shape[0]
    if n == bsz:
        return torch.bmm(a, b)
    return torch.matmul(a.reshape(n, -1, a.shape[-1]), b).view(bsz, a.shape[1], b.shape[-1])


class FoldedCrossAttention(CrossAttention):
    """The two-way blocks' cross attentions with the image-side projections folded away."""

    def token_to_image(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _token_to_image(attn, q, k, v)

    def image_to_token(self, attn: Attention, q: Tensor, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _image_to_token(attn, q, x, k, v)


def _token_to_image(attn: Attention, q_in: Tensor, k: Tensor, x: Tensor) -> Tensor:
    """attn(q=q_in, k=k, v=x) with k, x (n, hw, C) shared by groups of the B query sets."""
    bsz, t, c = q_in.shape
    heads, dh = attn.num_heads, attn.internal_dim // attn.num_heads
    q = attn.q_proj(q_in).view(bsz, t, heads, dh)
    # scores: q_h W_k,h (k)^T; q_h b_k,h is constant along the keys, a no-op under softmax.
    u = torch.einsum("bthd,hdc->bhtc", q, attn.k_proj.weight.view(heads, dh, c)) * dh**-0.5
    probs = _grouped_bmm(u.reshape(bsz, heads * t, c), k.transpose(1, 2)).softmax(dim=-1)
    mixed = _grouped_bmm(probs, x).view(bsz, heads, t, c)  # softmax(.) x, per head
    v = torch.einsum("bhtc,hdc->bthd", mixed, attn.v_proj.weight.view(heads, dh, c))
    v = v + attn.v_proj.bias.view(heads, dh)  # softmax rows sum to 1
    return attn.out_proj(v.reshape(bsz, t, heads * dh))


def _image_to_token(attn: Attention, q_in: Tensor, x: Tensor, k_in: Tensor, v_in: Tensor) -> Tensor:
    """x + attn(q=q_in, k=k_in, v=v_in) with q_in, x (n, hw, C) shared by groups of the B prompts.
    Per-prompt x (n == B) is the decoder's own temporary: the output accumulates into it."""
    bsz, t, c = k_in.shape
    n, hw = q_in.shape[:2]
    heads, dh = attn.num_heads, attn.internal_dim // attn.num_heads
    k = attn.k_proj(k_in).view(bsz, t, heads, dh) * dh**-0.5
    v = attn.v_proj(v_in).view(bsz, t, heads, dh)
    wq = attn.q_proj.weight.view(heads, dh, c)
    fold_q = torch.einsum("hdc,bthd->bcht", wq, k).reshape(bsz, c, heads * t)
    bias = torch.einsum("hd,bthd->bht", attn.q_proj.bias.view(heads, dh), k).reshape(bsz, 1, heads * t)
    # out = sum_h A_h v_h W_o,h^T + b_o; each head's probabilities sum to 1, so b_o / heads per row.
    fold_o = torch.einsum("bthd,chd->bhtc", v, attn.out_proj.weight.view(c, heads, dh)).reshape(bsz, heads * t, c)
    fold_o = fold_o + attn.out_proj.bias / heads
    # Scores laid out (B, heads, tokens, hw): the softmax over each head's few tokens then runs
    # along a long contiguous axis (a 7-wide last axis is several times slower on CPU).
    if n == bsz:
        scores = torch.baddbmm(bias.transpose(1, 2), fold_q.transpose(1, 2), q_in.transpose(1, 2))
    else:
        g = bsz // n
        stacked = fold_q.view(n, g, c, heads * t).permute(0, 1, 3, 2).reshape(n, g * heads * t, c)
        scores = torch.matmul(stacked, q_in.transpose(1, 2)).view(bsz, heads * t, hw) + bias.transpose(1, 2)
    probs = scores.view(bsz, heads, t, hw).softmax(dim=2).view(bsz, heads * t, hw).transpose(1, 2)
    if n == bsz:
        if x.dtype != torch.float32:  # bfloat16 baddbmm_ with this transposed batch takes a naive loop on CPU
            return x.add_(torch.bmm(probs, fold_o))
        return x.baddbmm_(probs, fold_o)
    if n == 1 and x.dtype == torch.float32:  # the image's tokens broadcast into the product: no extra pass
        return torch.baddbmm(x, probs, fold_o)
    return add_groups(x, torch.bmm(probs, fold_o))


def _upscaled_masks(up: nn.Sequential, x: Tensor, hyper: Tensor, h: int, w: int) -> Tensor:
    """Masks (B, k, 4h, 4w) from image tokens x (B or n, hw, C) and hypernetwork outputs (B, k, C/8).

    Each 2x2 stride-2 transposed convolution maps one pixel to a 2x2 block: a matmul into
    (sub-pixel, channel) columns. LayerNorm and GELU act per pixel, so they run on that layout, and
    the final pixel order is restored only for the k mask planes.
    """
    conv1, norm, act1, conv2, act2 = up
    bsz, k, _ = hyper.shape
    c = x.shape[-1]
    c1, c2 = conv1.out_channels, conv2.out_channels
    # (sub-pixel, out channel) x in channel: the transposed convolutions as linear layers
    w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)
    w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)
    if x.shape[0] != bsz:
        x = x.repeat_interleave(bsz // x.shape[0], dim=0)
    y = _linear(x.reshape(-1, c), w1, conv1.bias.repeat(4)).view(-1, c1)
    y = act1(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
    z = _linear(y, w2, conv2.bias.repeat(4), act2).view(bsz, -1, c2)
    masks = torch.bmm(z, hyper.transpose(1, 2))  # (B, hw * 16, k): rows (i, j, di, dj, ei, ej)
    masks = masks.view(bsz, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(bsz, k, 4 * h, 4 * w)


def _fused_linear_op():
    """oneDNN's linear with the bias and GELU applied as it writes (PyTorch's own op for Inductor's
    CPU fusions), or None where PyTorch was built without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_FUSED_LINEAR = _fused_linear_op()


@functools.lru_cache(maxsize=None)
def fused_linear_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear runs in `dtype` on this CPU. Without AVX-512 oneDNN has no
    bfloat16 inner product at all (it refuses with "could not create a primitive descriptor"),
    while PyTorch's own capability check may still say yes: so it is tried once, on a tiny input,
    and those CPUs take the plain matmul in that dtype."""
    if _FUSED_LINEAR is None:
        return False
    x = torch.zeros(2, 16, dtype=dtype)
    try:
        _FUSED_LINEAR(x, torch.zeros(16, 16, dtype=dtype), torch.zeros(16, dtype=dtype), "none", [], "")
    except RuntimeError:
        return False
    return True


def _linear(x: Tensor, weight: Tensor, bias: Tensor, act: Optional[nn.Module] = None) -> Tensor:
    """act(x @ weight.T + bias). On the CPU oneDNN adds the bias and applies a GELU in the
    matmul's own pass: the upscaler's two linear layers, the widest in the decoder, otherwise spend
    a third of their time copying the bias into the output and another pass on the GELU."""
    gelu = type(act) is nn.GELU
    fusable = act is None or gelu
    if (
        fusable
        and _FUSED_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and fused_linear_runs(x.dtype)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return _FUSED_LINEAR(
            x, weight.contiguous(), bias, "gelu" if gelu else "none", [], act.approximate if gelu else ""
        )
    y = torch.addmm(bias, x, weight.T)
    return y if act is None else act(y)
