"""The SAM model: image encoder + prompt encoder + mask decoder, with pre- and post-processing."""

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MaskDecoder
from .pixels import PIXEL_MEAN, PIXEL_STD, normalize_and_pad
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not stored in checkpoints (persistent=False), as in the official model.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (..., 3, h, w) 0..255 pixels and zero-pad to the encoder's square input."""
        return normalize_and_pad(x, self.img_size, self.pixel_mean, self.pixel_std)

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """Upscale (B, C, 256, 256) logits to the padded input, crop the padding, resize to the original."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, torch.Tensor]]:
        """End-to-end prediction for a list of images with prompts, as the official `Sam.forward`.

        Each record holds 'image' (3xHxW, already resized), 'original_size' (H, W) and optionally
        'point_coords' (BxNx2), 'point_labels' (BxN), 'boxes' (Bx4), 'mask_inputs' (Bx1x256x256),
        all in the resized frame. Returns per image 'masks', 'iou_predictions', 'low_res_logits'.
        """
        images = torch.stack([self.preprocess(r["image"]) for r in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(points, record.get("boxes"), record.get("mask_inputs"))
            low_res, iou = self.mask_decoder(
                embedding.unsqueeze(0), self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs
