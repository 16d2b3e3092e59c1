"""One distillation step, in pure PyTorch: the same object runs inside Ray Train workers (wrapped in
DDP) and in a plain process (benchmarks, tests).

The teacher's image encoder never runs: its embeddings come stored with the batch. The teacher's
prompt encoder and mask decoder (frozen) decode the same prompts on those embeddings.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..modeling import Sam
from ..transforms import normalize_and_pad
from .losses import LossWeights, mask_iou, prompt_losses, total_loss
from .prompts import HardPromptSampler, PromptConfig, cells_to_points, sample_cells


@dataclass
class DistillConfig:
    prompts: PromptConfig = field(default_factory=PromptConfig)
    weights: LossWeights = field(default_factory=LossWeights)
    lr: float = 1e-3
    decoder_lr_scale: float = 0.1  # the decoder starts from the teacher's: move it gently
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01  # cosine decay from lr to lr * min_lr_ratio over the run
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    hard_prompt_sampling: bool = True  # False: points inside the label only, no iterations
    seed: int = 0
    # Train only the student's parameters whose names start with one of these (empty: all): to
    # fine-tune part of a student, e.g. a re-initialised last stage, without paying the backward
    # pass through the rest
    train_only: Tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DistillConfig":
        d = dict(d)
        d["train_only"] = tuple(d.get("train_only", ()))  # a list in JSON
        return cls(prompts=PromptConfig(**d.pop("prompts", {})), weights=LossWeights(**d.pop("weights", {})), **d)


def init_student_decoder(student: Sam, teacher: Sam) -> None:
    """The student starts from the teacher's prompt encoder and mask decoder (TinySAM, MobileSAM)."""
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())


def match_embedding_statistics(student: Sam, teacher_embeddings: torch.Tensor) -> None:
    """For an encoder trained from scratch: set the last LayerNorm of its neck to the teacher
    embeddings' per-channel mean and spread, so that training starts at the teacher's scale
    (teacher embeddings are ~0.1 in size, a fresh LayerNorm's output ~1)."""
    norm = student.image_encoder.neck[-1]
    emb = teacher_embeddings.float()
    with torch.no_grad():
        norm.weight.copy_(emb.std(dim=(0, 2, 3)))
        norm.bias.copy_(emb.mean(dim=(0, 2, 3)))


def decode(sam: Sam, embedding: torch.Tensor, prompts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Decode one image's prompts: points (one point -> the 3 multimask outputs) or boxes."""
    if "boxes" in prompts:
        sparse, dense = sam.prompt_encoder(None, prompts["boxes"], None)
        multimask = False
    else:
        sparse, dense = sam.prompt_encoder((prompts["coords"], prompts["labels"]), None, None)
        multimask = prompts["coords"].shape[1] == 1
    masks, iou, tokens = sam.mask_decoder(
        embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=multimask, return_tokens=True
    )
    return {"masks": masks, "iou": iou, "tokens": tokens}


class StudentForward(nn.Module):
    """The student's whole differentiable step as one module, so that DDP sees every parameter use
    in one forward: encoder -> hard prompt sampling (no grad, on the detached embedding) -> decode."""

    def __init__(self, sam: Sam, sampler: HardPromptSampler, hard_sampling: bool = True) -> None:
        super().__init__()
        self.sam = sam
        self.sampler = sampler
        self.hard_sampling = hard_sampling

    def forward(self, images: torch.Tensor, targets: List[torch.Tensor], seeds: List[int]):
        embeddings = self.sam.image_encoder(images)
        groups: List[List[Dict[str, Any]]] = []
        for i, (gt, seed) in enumerate(zip(targets, seeds)):
            groups.append([])
            if gt is None or not len(gt):
                continue
            g = torch.Generator().manual_seed(seed)
            emb = embeddings[i : i + 1]
            picks = self.sampler.choose(len(gt), g)
            if len(picks["box"]):
                prompts = {"boxes": self.sampler.boxes(gt[picks["box"]], g)}
                groups[-1].append({"prompts": prompts, "gt": gt[picks["box"]], "out": decode(self.sam, emb, prompts)})
            if len(picks["point"]):
                target = gt[picks["point"]]
                frozen = emb.detach()
                n_iter = self.sampler.iterations(g) if self.hard_sampling else 0
                prompts = self.sampler.points(
                    target,
                    lambda c, lab: decode(self.sam, frozen, {"coords": c, "labels": lab})["masks"],  # noqa: B023
                    n_iter,
                    g,
                )
                groups[-1].append(
                    {"prompts": prompts, "gt": target, "out": decode(self.sam, emb, prompts), "iterations": n_iter}
                )
        return embeddings, groups


class Distiller:
    """Owns the student (optionally wrapped, e.g. by DDP), the frozen teacher decoder, the
    optimiser and the schedule; `train_step` runs one step on a batch and returns its metrics."""

    def __init__(
        self,
        student: Sam,
        teacher: Sam,
        config: DistillConfig,
        total_steps: int,
        device: Optional[torch.device] = None,
        wrap=None,
    ) -> None:
        self.config = config
        self.device = device or torch.device("cpu")
        self.student = student.to(self.device)
        if config.train_only:
            trained = [
                n
                for n, p in student.named_parameters()
                if p.requires_grad_(n.startswith(config.train_only)).requires_grad
            ]
            if not trained:
                raise ValueError(f"train_only {list(config.train_only)} names no parameter of the student")
        self.train_mode()
        teacher.image_encoder = None  # never used: teacher embeddings are stored
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        forward = StudentForward(self.student, HardPromptSampler(config.prompts), config.hard_prompt_sampling)
        self.forward = wrap(forward) if wrap else forward
        encoder = [p for p in self.student.image_encoder.parameters() if p.requires_grad]
        decoder = [
            p
            for m in (self.student.prompt_encoder, self.student.mask_decoder)
            for p in m.parameters()
            if p.requires_grad
        ]
        groups = [{"params": encoder, "lr": config.lr}, {"params": decoder, "lr": config.lr * config.decoder_lr_scale}]
        self.optimizer = torch.optim.Adam([g for g in groups if g["params"]])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor(total_steps))
        self.step = 0
        self.amp = config.amp and self.device.type == "cuda"

    def _lr_factor(self, total_steps: int):
        warmup, floor = self.config.warmup_steps, self.config.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return factor

    def _inputs(self, batch: Dict[str, np.ndarray]):
        pixels = torch.from_numpy(np.asarray(batch["pixels"])).to(self.device)
        images = torch.stack(
            [
                normalize_and_pad(
                    pixels[i, :h, :w].permute(2, 0, 1), 1024, self.student.pixel_mean, self.student.pixel_std
                )
                for i, (h, w) in enumerate(zip(batch["input_h"], batch["input_w"]))
            ]
        )
        teacher_emb = torch.as_tensor(np.asarray(batch["embedding"])).to(self.device, torch.float32)
        targets = [
            torch.from_numpy(np.asarray(g[: int(n)])).to(self.device).bool()
            for g, n in zip(batch["gt"], batch["gt_count"])
        ]
        return images, teacher_emb, targets

    def train_step(self, batch: Dict[str, np.ndarray], seed: Optional[int] = None) -> Dict[str, float]:
        """One optimisation step. `seed` fixes the prompts (default: config seed + step)."""
        start = time.perf_counter()
        images, teacher_emb, targets = self._inputs(batch)
        base = self.config.seed * 1_000_003 + self.step if seed is None else seed
        seeds = [base * 131 + i for i in range(len(targets))]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            student_emb, groups = self.forward(images, targets, seeds)
            terms = {"embedding": (student_emb.float() - teacher_emb).abs().mean()}
            per_group = []
            for i, image_groups in enumerate(groups):
                for grp in image_groups:
                    with torch.no_grad():
                        t_out = decode(self.teacher, teacher_emb[i : i + 1], grp["prompts"])
                    s_out = {k: v.float() for k, v in grp["out"].items()}
                    t_out = {k: v.float() for k, v in t_out.items()}
                    per_group.append(prompt_losses(s_out, t_out, grp["gt"], self.config.weights))
        zero = student_emb.sum() * 0  # keeps the graph whole when an image has no labels
        for name in ("token", "output", "focal", "dice", "iou", "hard_weight"):
            terms[name] = torch.stack([g[name] for g in per_group]).mean() if per_group else zero
        loss = total_loss(terms, self.config.weights)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"step {self.step}: loss is {loss.item()} ({ {k: float(v) for k, v in terms.items()} })"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        iterations = [g["iterations"] for gs in groups for g in gs if "iterations" in g]
        return {
            "loss": float(loss.detach()),
            **{k: float(v.detach()) for k, v in terms.items()},
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "step_seconds": time.perf_counter() - start,
            "images": len(targets),
            "mean_iterations": float(np.mean(iterations)) if iterations else 0.0,
        }

    def train_mode(self) -> None:
        """The student in training mode, less the modules that `train_only` leaves untrained: those
        stay in eval mode, so that their BatchNorm statistics are the ones they were trained with."""
        self.student.train()
        if self.config.train_only:
            for module in self.student.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()

    @torch.no_grad()
    def recompute_bn_statistics(self, batch: Dict[str, np.ndarray]) -> None:
        """Precise BatchNorm (Wu & Johnson, 2021): set the encoder's running statistics (of the layers
        it trains) to those of `batch` (recent training images). Early in a run the running averages still hold mostly
        their initial values, and an eval-mode student would be judged on statistics it never had."""
        images, _, _ = self._inputs(batch)
        norms = [
            m
            for m in self.student.image_encoder.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters())
        ]
        if not norms:
            return
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over this batch
        self.train_mode()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.student.image_encoder(images)
        for m, momentum in zip(norms, saved):
            m.momentum = momentum

    @torch.no_grad()
    def evaluate(self, batches, points_per_image: int = 16) -> Dict[str, float]:
        """Student-vs-teacher mask mIoU on held-out images: one fixed point inside each of up to
        `points_per_image` labelled masks, each model's highest-scoring output, at 256x256."""
        self.student.eval()
        ious = []
        try:
            for batch in batches:
                images, teacher_emb, targets = self._inputs(batch)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    student_emb = self.student.image_encoder(images)
                for i, gt in enumerate(targets):
                    if not len(gt):
                        continue
                    g = torch.Generator().manual_seed(i)
                    gt = gt[:points_per_image]
                    cells = sample_cells(gt, g)
                    prompts = {
                        "coords": cells_to_points(cells["index"], gt.shape[-1])[:, None],
                        "labels": torch.ones(len(gt), 1, dtype=torch.int, device=gt.device),
                    }
                    s = decode(self.student, student_emb[i : i + 1].float(), prompts)
                    t = decode(self.teacher, teacher_emb[i : i + 1], prompts)
                    rows = torch.arange(len(gt), device=gt.device)
                    s_mask = s["masks"][rows, s["iou"].argmax(1)] > 0
                    t_mask = t["masks"][rows, t["iou"].argmax(1)] > 0
                    ious.append(mask_iou(s_mask, t_mask).cpu())
        finally:
            self.train_mode()
        values = torch.cat(ious) if ious else torch.zeros(0)
        return {"miou_vs_teacher": float(values.mean()) if len(values) else float("nan"), "eval_masks": len(values)}

    def state_dict(self) -> Dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
