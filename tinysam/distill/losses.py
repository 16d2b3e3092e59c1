"""TinySAM's training losses: full-stage distillation (embedding, decoder tokens, mask outputs with
hard mask weighting) plus SAM's ground-truth losses (focal + dice on masks, MSE on IoU predictions).

Every term has its own weight; a weight of 0 switches the term off (the paper's ablations).
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    """alpha, beta, gamma of the paper's L_distill, and the ground-truth terms (SAM: focal 20, dice 1)."""

    embedding: float = 1.0  # alpha
    token: float = 1.0  # beta
    output: float = 0.1  # gamma: L1 on mask logits is ~10x the others at the start (the paper gives no values)
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    hard_mask_weighting: bool = True


def mask_iou(pred: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU of boolean masks (..., H, W) -> (...)."""
    inter = (pred & gt).flatten(-2).sum(-1).float()
    union = (pred | gt).flatten(-2).sum(-1).float()
    return inter / (union + eps)


def hard_mask_weights(
    teacher_masks: torch.Tensor, student_masks: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """H_i = sigmoid(IoU(M_T, GT) / (IoU(M_S, GT) + eps) - 1): masks the student gets wrong where
    the teacher gets them right weigh more. Boolean (N, H, W) inputs -> (N,) weights."""
    return torch.sigmoid(mask_iou(teacher_masks, gt) / (mask_iou(student_masks, gt) + eps) - 1)


def focal_loss(logits: torch.Tensor, gt: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss (RetinaNet), mean over pixels: (N, H, W) -> (N,)."""
    target = gt.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-mask soft dice loss: (N, H, W) -> (N,)."""
    prob = logits.sigmoid().flatten(1)
    target = gt.float().flatten(1)
    return 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)


def prompt_losses(
    student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor], gt: torch.Tensor, weights: LossWeights
) -> Dict[str, torch.Tensor]:
    """Loss terms of one group of prompts decoded by both models.

    `student` / `teacher`: "masks" (N, K, h, w) logits (K = 3 multimask outputs or 1), "iou" (N, K),
    "tokens" (N, T, C); `gt` (N, h, w) bool at the masks' resolution. Returns each term (mean
    over prompts) unweighted, and "hard_weight" (mean H_i) for logging.
    """
    s_masks, t_masks = student["masks"], teacher["masks"].detach()
    # SAM: of several outputs, the ground-truth losses train the one closest to the label.
    focal = torch.stack([focal_loss(s_masks[:, k], gt) for k in range(s_masks.shape[1])], 1)
    dice = torch.stack([dice_loss(s_masks[:, k], gt) for k in range(s_masks.shape[1])], 1)
    best = (weights.focal * focal + weights.dice * dice).argmin(1)
    rows = torch.arange(len(gt), device=gt.device)
    chosen = s_masks[rows, best]
    true_iou = mask_iou(chosen.detach() > 0, gt)
    # Hard mask weighting compares the masks each model would output (highest predicted IoU).
    with torch.no_grad():
        s_pick = s_masks[rows, student["iou"].argmax(1)] > 0
        t_pick = t_masks[rows, teacher["iou"].argmax(1)] > 0
        h = (
            hard_mask_weights(t_pick, s_pick, gt)
            if weights.hard_mask_weighting
            else torch.ones(len(gt), device=gt.device)
        )
    per_mask_l1 = (s_masks - t_masks).abs().flatten(1).mean(1)
    return {
        "token": F.l1_loss(student["tokens"], teacher["tokens"].detach()),
        "output": (h * per_mask_l1).mean(),
        "focal": focal[rows, best].mean(),
        "dice": dice[rows, best].mean(),
        "iou": F.mse_loss(student["iou"][rows, best], true_iou),
        "hard_weight": h.mean(),
    }


def total_loss(terms: Dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """L_total = alpha L_embedding + beta L_token + gamma sum H_i L_output_i + L_mask + L_iou."""
    return (
        weights.embedding * terms["embedding"]
        + weights.token * terms["token"]
        + weights.output * terms["output"]
        + weights.focal * terms["focal"]
        + weights.dice * terms["dice"]
        + weights.iou * terms["iou"]
    )
