"""SAM's mask decoder: a two-way transformer over prompt + output tokens and the image, then
hypernetwork MLPs that turn mask tokens into 256x256 mask logits, and an IoU head."""

from typing import Tuple, Type, Union

import torch
from torch import nn

from .common import MLP, LayerNorm2d, add_groups


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        return_tokens: bool = False,
        fast_upscaling: bool = False,
    ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Predict masks for B prompts.

        Args:
          image_embeddings: (n, C, 64, 64) with n dividing B: prompt b belongs to image b // (B / n)
            (n = 1: one image, all prompts; n = B: one image per prompt).
          image_pe: (1, C, 64, 64).
          sparse_prompt_embeddings: (B, N, C).
          dense_prompt_embeddings: (B, C, 64, 64) or (1, C, 64, 64).
          multimask_output: the 3 disambiguating masks, or the single-mask output.
          return_tokens: also return the transformer's output tokens (B, 1 + 4 + N, C), the
            distillation target of TinySAM's token loss.
          fast_upscaling: run the upscaling path channels-last with fused LayerNorm: faster for
            large prompt batches on CPU, logits within ~2e-4 of the default path (fp32 rounding).
            Everything mode uses it; the default matches the official rounding.
        Returns:
          masks (B, 3 or 1, 256, 256) logits, iou_pred (B, 3 or 1)[, tokens].
        """
        masks, iou_pred, tokens = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, fast_upscaling
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        if return_tokens:
            return masks[:, sel], iou_pred[:, sel], tokens
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        fast_upscaling: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All 4 masks, all 4 IoU predictions and the output tokens."""
        b = sparse_prompt_embeddings.shape[0]
        n = image_embeddings.shape[0]
        if n == 0 or b % n:
            raise ValueError(f"{b} prompts cannot be split evenly among {n} image embeddings")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)

        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]  # an expanded "no mask" embedding: keep the images shared
        src = image_embeddings + dense if dense.shape[0] in (1, n) else add_groups(image_embeddings, dense)
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        h, w = image_embeddings.shape[-2:]
        # The (B, h*w, C) image tokens are channels-last already: the fast path views them as
        # NCHW without a copy and stays channels-last through the upscaling.
        src = src.reshape(b, h, w, self.transformer_dim).permute(0, 3, 1, 2)
        if not fast_upscaling:
            src = src.contiguous()
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        bu, c, hu, wu = upscaled.shape
        if fast_upscaling:
            pixels = upscaled.permute(0, 2, 3, 1).reshape(bu, hu * wu, c)
            masks = (pixels @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(bu, -1, hu, wu)
        else:
            masks = (hyper_in @ upscaled.reshape(bu, c, hu * wu)).view(bu, -1, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred, hs
