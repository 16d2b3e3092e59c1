"""SamPredictor: encode an image once, then answer many prompts against its embedding.

Drop-in for the official predictor (same methods, arguments and returns), plus: any common image
type is converted (grayscale, RGBA, 16-bit), stored embeddings can be set directly, and many
prompts can be answered in one decoder call by passing batched points or boxes, through a faster
decoder (see `SamPredictor.__init__`).
"""

from typing import Optional, Tuple

import numpy as np
import torch

from .modeling import Sam, folded_decoder
from .transforms import ResizeLongestSide, get_preprocess_shape, to_rgb_uint8


class SamPredictor:
    def __init__(self, sam_model: Sam, fast_decoder: bool = True) -> None:
        """`fast_decoder`: decode with everything mode's folded decoder (a quantized decoder: the
        channels-last upscaler): the same function, ~2x faster on CPU for many prompts at once,
        logits equal to the official path's up to fp32 rounding (~1e-6 of their size). False: the
        official operation order."""
        self.model = sam_model
        self.fast_decoder = fast_decoder
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: Optional[torch.Tensor] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    @torch.inference_mode()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the embedding of an HxW(xC) image (uint8 RGB, or anything `to_rgb_uint8` converts)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = to_rgb_uint8(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(x, image.shape[:2])

    @torch.inference_mode()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Set an already resized (1, 3, h, w) 0..255 image tensor."""
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[:2] != (1, 3)
            or max(transformed_image.shape[2:]) != self.model.image_encoder.img_size
        ):
            raise ValueError(
                f"set_torch_image expects (1, 3, h, w) with longest side {self.model.image_encoder.img_size}, "
                f"got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features = self.model.image_encoder(self.model.preprocess(transformed_image))
        self.is_image_set = True

    def set_embedding(self, embedding: torch.Tensor, original_size: Tuple[int, int]) -> None:
        """Use a precomputed (256, 64, 64) or (1, 256, 64, 64) embedding of an image of `original_size` (H, W)."""
        embedding = torch.as_tensor(embedding)
        if embedding.ndim == 3:
            embedding = embedding[None]
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"set_embedding expects (256, 64, 64) or (1, 256, 64, 64), got {tuple(embedding.shape)}")
        self.reset_image()
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = get_preprocess_shape(*self.original_size, self.model.image_encoder.img_size)
        self.features = embedding.to(device=self.device, dtype=torch.float32)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, 256, 64, 64) embedding of the current image."""
        self._require_image()
        return self.features

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for prompts given in original image pixels.

        Args:
          point_coords: (N, 2) XY points for one prompt, or (B, N, 2) for B prompts.
          point_labels: (N,) or (B, N): 1 foreground, 0 background.
          box: (4,) XYXY for one prompt, or (B, 4) for B prompts.
          mask_input: (1, 256, 256) or (B, 1, 256, 256) low-res logits from a previous call.
          multimask_output: three candidate masks instead of one (better for ambiguous prompts).
          return_logits: return logits instead of binary masks.
        Returns:
          masks (C, H, W), iou_predictions (C,), low_res_logits (C, 256, 256); with B prompts each
          gains a leading B axis.
        """
        self._require_image()
        batched = (
            (point_coords is not None and np.ndim(point_coords) == 3)
            or (box is not None and np.ndim(box) == 2 and np.shape(box)[0] != 1)
            or (mask_input is not None and np.ndim(mask_input) == 4)
        )
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = self.transform.apply_coords(np.asarray(point_coords, dtype=float), self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
            labels_t = torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=self.device)
            if coords_t.ndim == 2:
                coords_t, labels_t = coords_t[None], labels_t[None]
            if coords_t.shape[:2] != labels_t.shape or coords_t.shape[-1] != 2:
                raise ValueError(
                    f"point_coords {tuple(np.shape(point_coords))} and point_labels "
                    f"{tuple(np.shape(point_labels))} do not match (expected (N, 2) and (N,))"
                )
        if box is not None:
            boxes = self.transform.apply_boxes(np.asarray(box, dtype=float), self.original_size)
            box_t = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(-1, 4)
        if mask_input is not None:
            mask_t = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=self.device)
            if mask_t.ndim == 3:
                mask_t = mask_t[None]
        masks, iou, low_res = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output, return_logits)
        out = tuple(t.detach().cpu().numpy() for t in (masks, iou, low_res))
        return out if batched else tuple(t[0] for t in out)

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction with prompts already in the resized (1024) frame: points (B, N, 2),
        labels (B, N), boxes (B, 4), mask inputs (B, 1, 256, 256)."""
        self._require_image()
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        # chosen per call: the model may be quantized after the predictor was made
        decoder = self.model.mask_decoder
        if self.fast_decoder:
            decoder = folded_decoder.fast_decoder(decoder)
        low_res, iou = decoder(self.features, self.model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) (or .set_embedding(...)) first.")
