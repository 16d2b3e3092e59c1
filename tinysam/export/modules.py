"""The exportable graphs: the image encoder on a preprocessed batch, and the prompt encoder + mask
decoder with the official SAM ONNX interface (`segment_anything.utils.onnx.SamOnnxModel`), so an
application written against the official `sam_onnx_example` runs our files unchanged."""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import Sam

DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


class SamOnnxEncoder(nn.Module):
    """(B, 3, 1024, 1024) normalised, padded pixels (`tinysam.transforms.prepare_image`) -> embeddings."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class SamOnnxDecoder(nn.Module):
    """Prompt encoder, mask decoder and mask post-processing as one graph, the official interface:
    points in the resized (1024) frame with labels (-1 padding, 0 negative, 1 positive, 2/3 box
    corners), an optional low-res mask input, and the original image size. Returns the masks' logits
    at the original size, their predicted IoUs and the 256x256 logits."""

    def __init__(self, model: Sam, return_single_mask: bool = True) -> None:
        super().__init__()
        self.model = model
        self.img_size = model.image_encoder.img_size
        self.return_single_mask = return_single_mask

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        coords = (point_coords + 0.5) / self.img_size
        embedding = pe.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1).expand_as(embedding)
        embedding = embedding * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            embedding = embedding + pe.point_embeddings[i].weight * (labels == i)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        return has_mask_input * pe.mask_downscaling(mask_input) + (
            1 - has_mask_input
        ) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        resized = torch.floor(self.img_size / torch.max(size) * size + 0.5).to(torch.int64)
        masks = masks[..., : resized[0], : resized[1]]
        h, w = orig_im_size.to(torch.int64)[0], orig_im_size.to(torch.int64)[1]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    def _select(self, masks: torch.Tensor, iou: torch.Tensor, num_points: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # One point: the best of the three disambiguating masks; more: the single-mask output. A
        # score offset instead of control flow keeps the graph static, as in the official export.
        reweight = torch.tensor([[1000] + [0] * (self.model.mask_decoder.num_mask_tokens - 1)], device=iou.device)
        best = torch.argmax(iou + (num_points - 2.5) * reweight, dim=1)
        rows = torch.arange(masks.shape[0])
        return masks[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        masks, iou, _ = self.model.mask_decoder.predict_masks(
            image_embeddings,
            self.model.prompt_encoder.get_dense_pe(),
            self._embed_points(point_coords, point_labels),
            self._embed_masks(mask_input, has_mask_input),
        )
        if self.return_single_mask:
            masks, iou = self._select(masks, iou, point_coords.shape[1])
        return self._postprocess(masks, orig_im_size), iou, masks
