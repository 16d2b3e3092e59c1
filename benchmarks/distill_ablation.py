"""The paper's ablation of its distillation method, at the recovery experiment's scale: which parts
of the loss bring a damaged student back to its teacher, at equal steps and seeds.

Same set-up as benchmarks/distill_recovery.py (the real `vit_t` teacher, standing in for SAM-H;
a student with the last TinyViT stage and the neck re-initialised, only that part trained;
augmented views of scikit-image photos, the held-out photos never among them), through the same
jobs: the training data and the teacher's embeddings are made once, then `jobs/distill.py` trains
each variant for `--steps` steps from the same damaged student, for each seed (the seed draws the
re-initialised weights and the job's prompts and order). The variants, each adding to the one before:

  embedding      the embedding loss only (alpha; beta = gamma = 0, no ground-truth terms)
  full-stage     + the token and output losses and the ground-truth terms, plain weights and prompts
  hard-mask      + hard mask weighting of the output loss
  hard-prompt    + hard prompt sampling (the job's default: the paper's full method)

Each exported student is judged on the held-out photos: box-prompt and 1-point mIoU against the
teacher's masks.

    python benchmarks/distill_ablation.py [--steps 40] [--seeds 0 1] [--views 64]

Prints a Markdown table (mean and each seed); the last line is a JSON object with every run.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path
from distill_recovery import (  # benchmarks/distill_recovery.py: the experiment's set-up
    REINITIALISED,
    HeldOut,
    damaged_student,
    held_out_images,
    run_job,
    training_shard,
)

from tinysam import build_sam
from tinysam.transforms import to_rgb_uint8
from tinysam_samples import ALL_PHOTOS, sample_images

PLAIN = ["--no-hard-mask-weighting", "--no-hard-prompt-sampling"]
VARIANTS: Dict[str, List[str]] = {
    "embedding": ["--beta", "0", "--gamma", "0", "--focal", "0", "--dice", "0", "--iou", "0", *PLAIN],
    "full-stage": PLAIN,
    "hard-mask": ["--no-hard-prompt-sampling"],
    "hard-prompt": [],
}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--checkpoint", default="mobile_sam", help="the teacher (vit_t weights)")
    parser.add_argument("--eval-images", help="folder of held-out photos (default: four scikit-image photos)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--views", type=int, default=64, help="augmented training views")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompts-per-image", type=int, default=8)
    parser.add_argument("--max-iterations", type=int, default=2, help="hard prompt sampling iterations, at most")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.smoke:  # one step of two variants on two views, one seed, one held-out crop
        args.steps, args.seeds, args.views, args.prompts_per_image = 1, args.seeds[:1], 2, 2
        args.variants = args.variants[:1] + args.variants[-1:]
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tinysam-ablation-"))
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    runs = []
    try:
        teacher = build_sam("vit_t", args.checkpoint)
        names, images = held_out_images(args.eval_images)
        training = tuple(p for p in ALL_PHOTOS if p not in names)
        started = time.perf_counter()
        shard = training_shard(teacher, training, args.views, work / "sa1b", points_per_side=4 if args.smoke else 8)
        run_job(
            ["jobs/precompute_embeddings.py", "--input", str(shard.parent), "--output", str(work / "emb")]
            + ["--teacher", "vit_t", "--checkpoint", args.checkpoint, "--num-cpus", str(args.threads + 1)],
            env,
        )
        held = HeldOut(teacher, [images[0][:256, :256]], 4, 4) if args.smoke else HeldOut(teacher, images)
        start_image = to_rgb_uint8(sample_images(training[:1])[0][1], training[0])
        print(f"data, embeddings and the teacher's answers: {time.perf_counter() - started:.0f} s", flush=True)
        for seed in args.seeds:
            init = damaged_student(args.checkpoint, work / f"init_{seed}.pth", start_image, REINITIALISED, seed)
            before = held.miou(build_sam("vit_t", str(init)))
            runs.append({"variant": "before", "seed": seed, **before})
            for variant in args.variants:
                trained = time.perf_counter()
                exported = work / f"{variant}_{seed}.pth"
                run_job(
                    ["jobs/distill.py", "--embeddings", str(work / "emb"), "--teacher-checkpoint", args.checkpoint]
                    + ["--student", "vit_t", "--student-checkpoint", str(init), "--num-workers", "1"]
                    + ["--cpus-per-worker", str(args.threads), "--num-cpus", str(args.threads + 1)]
                    + ["--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(seed)]
                    + ["--prompts-per-image", str(args.prompts_per_image)]
                    + ["--max-iterations", str(args.max_iterations), "--train-only", *REINITIALISED]
                    + ["--warmup-steps", str(min(20, args.steps // 10)), "--val-fraction", "0.05"]
                    + ["--storage-path", str(work / "runs"), "--name", f"{variant}_{seed}", "--export", str(exported)]
                    + VARIANTS[variant],
                    env,
                )
                minutes = (time.perf_counter() - trained) / 60
                runs.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "minutes": round(minutes, 2),
                        **held.miou(build_sam("vit_t", str(exported))),
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nvit_t, {' '.join(REINITIALISED)} re-initialised and trained, {args.steps} steps, {args.views} views of "
        f"{len(training)} photos, {args.prompts_per_image} prompts per view, lr {args.lr}; held out: {', '.join(names)}"
    )
    print(
        "| variant | box mIoU vs teacher (mean) | 1-point mIoU (mean) | "
        + " | ".join(f"box, point (seed {s})" for s in args.seeds)
        + " |"
    )
    print("|---" * (3 + len(args.seeds)) + "|")
    for variant in ["before", *args.variants]:
        rows = [r for r in runs if r["variant"] == variant]
        per_seed = " | ".join(f"{r['box_miou']:.4f}, {r['point_miou']:.4f}" for r in rows)
        print(
            f"| {variant} | {np.mean([r['box_miou'] for r in rows]):.4f} | "
            f"{np.mean([r['point_miou'] for r in rows]):.4f} | {per_seed} |"
        )
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "views": args.views, "runs": runs}))


if __name__ == "__main__":
    main()
