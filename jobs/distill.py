"""Distil a student SAM from a teacher's stored embeddings on Ray Train (TinySAM's full-stage
distillation with hard prompt sampling and hard mask weighting).

    ray job submit --working-dir . -- python jobs/distill.py --embeddings s3://bucket/embeddings \
        --teacher-checkpoint sam_vit_h --num-workers 8 --use-gpu --storage-path s3://bucket/runs --name tinysam \
        --export s3://bucket/tinysam.pth
    python jobs/distill.py --embeddings out/ --teacher-checkpoint mobile_sam --student vit_t_mini --steps 20

A killed worker restarts from the last checkpoint (--max-failures); a killed job continues with
--resume and the same --storage-path/--name. Exit status: 0 done, 2 refused before any work.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.distill import DistillJob, check_job, distill  # noqa: E402
from pipelines.runtime import init_ray  # noqa: E402
from tinysam.distill import LossWeights  # noqa: E402
from tinysam.weights import CheckpointError  # noqa: E402


def parse(argv=None) -> Tuple[DistillJob, Optional[int]]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--embeddings", required=True, help="a precompute job's output (folder or s3:// prefix)")
    p.add_argument(
        "--teacher-checkpoint", help="the checkpoint that made the embeddings (its decoder is the teacher's)"
    )
    p.add_argument("--student", default="vit_t", help="student model type (vit_t; vit_t_mini for quick runs)")
    p.add_argument(
        "--student-checkpoint",
        help="start from these weights (default: encoder from scratch, prompt encoder and decoder from the teacher)",
    )
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per worker")
    p.add_argument("--batch-size", type=int, default=1, help="images per worker per step")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, help="total steps (overrides --epochs)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: one per epoch)")
    p.add_argument("--storage-path", default="distill_runs", help="folder or s3:// prefix for checkpoints")
    p.add_argument("--name", default="distill", help="run name (a folder under --storage-path)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run --storage-path/--name from its last checkpoint"
    )
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of images held out for mIoU")
    p.add_argument("--max-masks", type=int, default=64, help="labelled masks kept per image")
    p.add_argument("--export", help="write the final student here (official checkpoint layout)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored when joining a cluster)")
    g = p.add_argument_group("method (defaults: the paper's where it gives them)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--decoder-lr-scale", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--prompts-per-image", type=int, default=64)
    g.add_argument("--max-iterations", type=int, default=9, help="hard prompt sampling iterations drawn from 0..N")
    g.add_argument("--box-fraction", type=float, default=0.5)
    g.add_argument("--no-hard-prompt-sampling", action="store_true")
    g.add_argument("--no-hard-mask-weighting", action="store_true")
    defaults = LossWeights()
    for flag, term in (
        ("alpha", "embedding"),
        ("beta", "token"),
        ("gamma", "output"),
        ("focal", "focal"),
        ("dice", "dice"),
        ("iou", "iou"),
    ):
        g.add_argument(
            f"--{flag}", type=float, default=getattr(defaults, term), help=f"weight of the {term} loss; 0: off"
        )
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    g.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    config = {
        "lr": a.lr,
        "decoder_lr_scale": a.decoder_lr_scale,
        "warmup_steps": a.warmup_steps,
        "grad_clip": a.grad_clip,
        "amp": not a.no_amp,
        "hard_prompt_sampling": not a.no_hard_prompt_sampling,
        "seed": a.seed,
        "prompts": {
            "prompts_per_image": a.prompts_per_image,
            "max_iterations": a.max_iterations,
            "box_fraction": a.box_fraction,
        },
        "weights": {
            "embedding": a.alpha,
            "token": a.beta,
            "output": a.gamma,
            "focal": a.focal,
            "dice": a.dice,
            "iou": a.iou,
            "hard_mask_weighting": not a.no_hard_mask_weighting,
        },
    }
    job = DistillJob(
        embeddings=a.embeddings,
        teacher_checkpoint=a.teacher_checkpoint,
        student=a.student,
        student_checkpoint=a.student_checkpoint,
        num_workers=a.num_workers,
        use_gpu=a.use_gpu,
        cpus_per_worker=a.cpus_per_worker,
        batch_size=a.batch_size,
        epochs=a.epochs,
        steps=a.steps,
        checkpoint_every=a.checkpoint_every,
        storage_path=a.storage_path,
        name=a.name,
        resume=a.resume,
        max_failures=a.max_failures,
        val_fraction=a.val_fraction,
        max_masks=a.max_masks,
        export=a.export,
        distill=config,
    )
    return job, a.num_cpus


def main(argv=None, on_step=None) -> int:
    """The job; `on_step(step, rank)` runs on every training worker after each step (test drills)."""
    job, num_cpus = parse(argv)
    try:
        checked = check_job(job)  # refusals come before Ray starts
        init_ray(num_cpus or job.num_workers * job.cpus_per_worker + 2, dashboard=True)
        summary = distill(job, checked, on_step)
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
