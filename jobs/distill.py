"""Distil a student SAM from a teacher's stored embeddings on Ray Train (TinySAM's full-stage
distillation with hard prompt sampling and hard mask weighting).

    ray job submit --working-dir . -- python jobs/distill.py --embeddings s3://bucket/embeddings \
        --teacher-checkpoint sam_vit_h --num-workers 8 --use-gpu --storage-path s3://bucket/runs --name tinysam \
        --export s3://bucket/tinysam.pth
    python jobs/distill.py --embeddings out/ --teacher-checkpoint mobile_sam --student vit_t_mini --steps 20

A killed worker restarts from the last checkpoint (--max-failures); a killed job continues with
--resume and the same --storage-path/--name. Exit status: 0 done, 2 refused before any work.
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.cli import checkpoint_arg, job_parser  # noqa: E402
from pipelines.distill import DistillJob, check_job, distill  # noqa: E402
from pipelines.runtime import init_ray  # noqa: E402
from tinysam.distill import DistillConfig, LossWeights, PromptConfig  # noqa: E402
from tinysam.weights import CheckpointError  # noqa: E402

# --alpha ... --iou: the paper's names for the loss weights
WEIGHT_FLAGS = (
    ("alpha", "embedding"),
    ("beta", "token"),
    ("gamma", "output"),
    ("focal", "focal"),
    ("dice", "dice"),
    ("iou", "iou"),
)


def add_run_arguments(p) -> None:
    """The data, the models, the workers and the run's storage; defaults are `DistillJob`'s."""
    job = DistillJob
    p.add_argument("--embeddings", required=True, help="a precompute job's output (folder or s3:// prefix)")
    p.add_argument(
        "--teacher-checkpoint",
        type=checkpoint_arg,
        help="the checkpoint that made the embeddings (its decoder is the teacher's)",
    )
    p.add_argument("--student", default=job.student, help="student model type (vit_t; vit_t_mini for quick runs)")
    p.add_argument(
        "--student-checkpoint",
        type=checkpoint_arg,
        help="start from these weights (default: encoder from scratch, prompt encoder and decoder from the teacher)",
    )
    p.add_argument("--num-workers", type=int, default=job.num_workers)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument(
        "--cpus-per-worker", type=int, default=job.cpus_per_worker, help="CPUs (and torch threads) per worker"
    )
    p.add_argument("--batch-size", type=int, default=job.batch_size, help="images per worker per step")
    p.add_argument("--epochs", type=int, default=job.epochs)
    p.add_argument("--steps", type=int, help="total steps (overrides --epochs)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: one per epoch)")
    p.add_argument("--storage-path", default=job.storage_path, help="folder or s3:// prefix for checkpoints")
    p.add_argument("--name", default=job.name, help="run name (a folder under --storage-path)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run --storage-path/--name from its last checkpoint"
    )
    p.add_argument("--max-failures", type=int, default=job.max_failures, help="worker failures to recover from")
    p.add_argument("--val-fraction", type=float, default=job.val_fraction, help="share of images held out for mIoU")
    p.add_argument("--max-masks", type=int, default=job.max_masks, help="labelled masks kept per image")
    p.add_argument("--export", help="write the final student here (official checkpoint layout)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored when joining a cluster)")


def add_method_arguments(p) -> None:
    """The distillation method; defaults are `DistillConfig`'s (the paper's where it gives them)."""
    method, prompts, weights = DistillConfig, PromptConfig, LossWeights
    g = p.add_argument_group("method (defaults: the paper's where it gives them)")
    g.add_argument("--lr", type=float, default=method.lr)
    g.add_argument("--decoder-lr-scale", type=float, default=method.decoder_lr_scale)
    g.add_argument("--warmup-steps", type=int, default=method.warmup_steps)
    g.add_argument("--grad-clip", type=float, default=method.grad_clip)
    g.add_argument("--prompts-per-image", type=int, default=prompts.prompts_per_image)
    g.add_argument(
        "--max-iterations",
        type=int,
        default=prompts.max_iterations,
        help="hard prompt sampling iterations drawn from 0..N",
    )
    g.add_argument("--box-fraction", type=float, default=prompts.box_fraction)
    g.add_argument("--no-hard-prompt-sampling", action="store_true")
    g.add_argument("--no-hard-mask-weighting", action="store_true")
    g.add_argument("--alpha", type=float, default=weights.embedding, help="weight of the embedding loss; 0: off")
    g.add_argument("--beta", type=float, default=weights.token, help="weight of the token loss; 0: off")
    g.add_argument("--gamma", type=float, default=weights.output, help="weight of the output loss; 0: off")
    g.add_argument("--focal", type=float, default=weights.focal, help="weight of the focal loss; 0: off")
    g.add_argument("--dice", type=float, default=weights.dice, help="weight of the dice loss; 0: off")
    g.add_argument("--iou", type=float, default=weights.iou, help="weight of the iou loss; 0: off")
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    g.add_argument(
        "--train-only",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="train only the student's parameters whose names start with these (e.g. image_encoder.layers.3.)",
    )
    g.add_argument("--seed", type=int, default=method.seed)


def method_config(a) -> Dict[str, Any]:
    """The `DistillConfig` of the method flags, as the dict a run records."""
    return {
        "lr": a.lr,
        "decoder_lr_scale": a.decoder_lr_scale,
        "warmup_steps": a.warmup_steps,
        "grad_clip": a.grad_clip,
        "amp": not a.no_amp,
        "hard_prompt_sampling": not a.no_hard_prompt_sampling,
        "seed": a.seed,
        "train_only": a.train_only,
        "prompts": {
            "prompts_per_image": a.prompts_per_image,
            "max_iterations": a.max_iterations,
            "box_fraction": a.box_fraction,
        },
        "weights": {
            **{term: getattr(a, flag) for flag, term in WEIGHT_FLAGS},
            "hard_mask_weighting": not a.no_hard_mask_weighting,
        },
    }


def parse(argv=None) -> Tuple[DistillJob, Optional[int]]:
    """The run's `DistillJob` and the CPUs of a local Ray."""
    p = job_parser(__doc__, exit_codes=None)
    add_run_arguments(p)
    add_method_arguments(p)
    a = p.parse_args(argv)
    run_fields = (
        "embeddings teacher_checkpoint student student_checkpoint num_workers use_gpu cpus_per_worker batch_size "
        "epochs steps checkpoint_every storage_path name resume max_failures val_fraction max_masks export"
    ).split()
    return DistillJob(**{k: getattr(a, k) for k in run_fields}, distill=method_config(a)), a.num_cpus


def main(argv=None) -> int:
    job, num_cpus = parse(argv)
    try:
        checked = check_job(job)  # refusals come before Ray starts
        init_ray(num_cpus or job.num_workers * job.cpus_per_worker + 2, dashboard=True)
        summary = distill(job, checked)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.table)
    print(
        f"steps {summary.steps}, images seen {summary.images_seen}, {summary.images_per_second:.2f} images/s, "
        f"data wait {100 * summary.data_wait_fraction:.1f}% of step time; loss {summary.loss_start:.4f} -> "
        f"{summary.loss_end:.4f}; mIoU(student, teacher) {summary.miou_start:.4f} -> {summary.miou_end:.4f}; "
        f"resumed at steps {summary.restarts or 'none'}"
    )
    print(f"checkpoint: {summary.checkpoint}" + (f"\nexported: {summary.export}" if summary.export else ""))
    print("SUMMARY " + json.dumps(summary.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
