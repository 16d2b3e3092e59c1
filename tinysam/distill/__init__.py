"""TinySAM distillation in pure PyTorch: losses, hard prompt sampling, the training step.
The Ray Train job that runs it at scale is `pipelines/distill/`."""

from .data import label_masks
from .distiller import DistillConfig, Distiller, decode, init_student_decoder
from .losses import LossWeights, hard_mask_weights, mask_iou, prompt_losses, total_loss
from .prompts import HardPromptSampler, PromptConfig

__all__ = [
    "DistillConfig",
    "Distiller",
    "HardPromptSampler",
    "LossWeights",
    "PromptConfig",
    "decode",
    "hard_mask_weights",
    "init_student_decoder",
    "label_masks",
    "mask_iou",
    "prompt_losses",
    "total_loss",
]
