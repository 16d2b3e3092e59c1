"""Hard prompt sampling (TinySAM): points start inside the ground-truth mask; for a random number
of iterations (0..9) the student predicts and the next point is drawn from where it is wrong
(`M_gt - M_i` as a positive, false positives as negatives). Boxes come from the label, jittered
as SAM trains them. Everything is drawn from one `torch.Generator`, so a seed fixes the prompts.

Masks live at the decoder's 256x256 resolution of the padded 1024x1024 input frame; a cell (y, x)
is the input-frame point (4x + 2, 4y + 2).
"""

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from .losses import mask_iou

SCALE = 4  # input frame pixels per decoder mask cell


@dataclass
class PromptConfig:
    prompts_per_image: int = 64
    max_iterations: int = 9  # hard sampling iterations drawn uniformly from 0..max_iterations
    box_fraction: float = 0.5  # share of the prompts that are boxes instead of points
    box_noise: float = 0.1  # box corner noise std, as a fraction of the box side (SAM)
    box_noise_max: float = 20.0  # ... capped at this many input-frame pixels (SAM)


def cells_to_points(flat: torch.Tensor, width: int) -> torch.Tensor:
    """Flat cell indices (N,) -> input-frame (x, y) points (N, 2)."""
    y, x = flat // width, flat % width
    return torch.stack([x, y], -1).float() * SCALE + SCALE / 2


def sample_cells(region: torch.Tensor, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """One cell drawn uniformly from each mask of `region` (N, H, W); "found" is False where a
    mask is empty (its "index" is then meaningless)."""
    weights = region.flatten(1).float()
    found = weights.sum(1) > 0
    weights[~found] = 1.0
    index = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(region.device)
    return {"index": index, "found": found}


def label_boxes(gt: torch.Tensor) -> torch.Tensor:
    """Input-frame XYXY boxes (N, 4) of boolean masks (N, H, W)."""
    rows, cols = gt.any(2), gt.any(1)
    h, w = gt.shape[-2:]
    ar_h = torch.arange(h, device=gt.device)
    ar_w = torch.arange(w, device=gt.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    return torch.stack([x0, y0, x1, y1], 1).float() * SCALE


def jitter_boxes(boxes: torch.Tensor, config: PromptConfig, generator: torch.Generator) -> torch.Tensor:
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, 1)
    noise = torch.randn(boxes.shape, generator=generator).to(boxes.device) * config.box_noise * side
    noise = noise.clamp(-config.box_noise_max, config.box_noise_max)
    return (boxes + noise).clamp(0, 1024)


class HardPromptSampler:
    """Draws the prompts of one image: which labelled masks, boxes or points, and the points'
    hard-sampling iterations against the student's own predictions."""

    def __init__(self, config: PromptConfig) -> None:
        self.config = config

    def choose(self, num_masks: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Indices of the labelled masks to prompt (without replacement when there are enough),
        split into box prompts and point prompts."""
        p = self.config.prompts_per_image
        if num_masks >= p:
            picks = torch.randperm(num_masks, generator=generator)[:p]
        else:
            picks = torch.randint(num_masks, (p,), generator=generator)
        n_box = int(round(p * self.config.box_fraction))
        return {"box": picks[:n_box], "point": picks[n_box:]}

    def iterations(self, generator: torch.Generator) -> int:
        return int(torch.randint(self.config.max_iterations + 1, (1,), generator=generator))

    def points(
        self,
        gt: torch.Tensor,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        iterations: int,
        generator: torch.Generator,
    ) -> Dict[str, torch.Tensor]:
        """Point prompts for the labelled masks `gt` (N, H, W) bool.

        `predict(coords (N, k, 2), labels (N, k))` returns the student's mask logits (N, K, H, W);
        of K > 1 outputs the one closest to the label counts (as SAM trains). Each iteration adds
        one point per prompt: positive where the label is missed, negative on a false positive,
        and a padding point (label -1) once a prediction is exact.
        """
        width = gt.shape[-1]
        first = sample_cells(gt, generator)
        coords = cells_to_points(first["index"], width)[:, None]
        labels = torch.where(first["found"], 1, -1)[:, None].to(torch.int)
        for _ in range(iterations):
            with torch.no_grad():
                logits = predict(coords, labels)
            masks = logits > 0
            ious = mask_iou(masks, gt[:, None].expand_as(masks))
            pred = masks[torch.arange(len(gt)), ious.argmax(1)]
            missed, extra = gt & ~pred, pred & ~gt
            pick = sample_cells(missed | extra, generator)
            positive = missed.flatten(1).gather(1, pick["index"][:, None])[:, 0]
            new_label = torch.where(
                pick["found"], positive.to(torch.int), torch.full_like(positive, -1, dtype=torch.int)
            )
            new_point = cells_to_points(pick["index"], width)
            coords = torch.cat([coords, new_point[:, None]], 1)
            labels = torch.cat([labels, new_label[:, None]], 1)
        return {"coords": coords, "labels": labels}

    def boxes(self, gt: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return jitter_boxes(label_boxes(gt), self.config, generator)
