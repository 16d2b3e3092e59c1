"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from functools import partial
from typing import Optional, Tuple, Type

from torch import Tensor, nn

from .common import MLPBlock, add_groups, attention, expand_groups, explicit_attention


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        point_embedding: Tensor,
        cross: Optional["CrossAttention"] = None,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
          image_embedding: (n, C, h, w) with n dividing B: prompt b belongs to image b // (B / n).
            A shared image's projections in the first layer are computed once, not once per prompt.
          image_pe: (1, C, h, w) positional encoding of the image grid.
          point_embedding: (B, N, C) prompt and output tokens.
          cross: how the two cross attentions are computed (default: the attention modules; the
            folded decoder passes its own, same function).
        Returns:
          the processed tokens (B, N, C) and image tokens (B, h*w, C).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        cross = cross or CrossAttention()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, cross)
        attn_out = cross.token_to_image(self.final_attn_token_to_image, queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, expand_groups(keys, queries.shape[0])


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, cross: Optional["CrossAttention"] = None
    ) -> Tuple[Tensor, Tensor]:
        cross = cross or CrossAttention()
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(
            queries + cross.token_to_image(self.cross_attn_token_to_image, queries + query_pe, k, keys)
        )
        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(cross.image_to_token(self.cross_attn_image_to_token, k, keys, queries + query_pe, queries))
        return queries, keys


class CrossAttention:
    """The two cross attentions of a two-way block, through the attention modules themselves.

    Image tokens (n, hw, C) may be shared by groups of the B prompts (n divides B).
    """

    def token_to_image(self, attn: "Attention", q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """attn(q=q, k=k, v=v): prompt tokens q (B, T, C) read the image tokens k, v."""
        return attn(q=q, k=k, v=v)

    def image_to_token(self, attn: "Attention", q: Tensor, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """x + attn(q=q, k=k, v=v): image tokens q read the prompt tokens k, v (B, T, C), residual x."""
        return add_groups(x, attn(q=q, k=k, v=v))


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate`."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        # (scores, values) matmul modules set by quantization; None: PyTorch's fused attention.
        self.matmuls: Optional[nn.ModuleList] = None

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        if q.shape[0] < k.shape[0]:  # an image's shared tokens querying each of its prompts
            q = expand_groups(q, k.shape[0])
        attend = (
            None if self.matmuls is None else partial(explicit_attention, score=self.matmuls[0], value=self.matmuls[1])
        )
        out = attention(q, k, v, attend)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))
