"""Distillation on Ray Train vs the same `Distiller` loop in one process, side by side in one run.

Both run the same steps (same student, teacher, prompts, threads, PyTorch's huge-page allocation)
on the job's training photos (real, pseudo labels from the real vit_t; photos differ in step cost,
so the held-out one is left out of the loop too); the loop has its rows in memory, the Ray run pays
for Ray Train (worker start, DDP wrapper, `ray.train.report` every step, checkpoints) and for being
fed by Ray Data. Goal: overhead <= 10% per step. Also prints the share of step time spent waiting for data.
On a 2-core machine, `--threads 1` leaves a core for Ray's own processes (as a cluster node has).

`--curve STEPS`: instead, does the student learn? The in-process loop for STEPS steps on all 18
scikit-image photos (a fifth held out by the job's own split), printing the held-out mask mIoU
against the teacher before training and every `--every` steps (the job's evaluation, after the
job's precise BatchNorm on the step's batch).

    python benchmarks/distill.py [--steps 12] [--student vit_t_mini] [--threads 2] [--data DIR]
    python benchmarks/distill.py --curve 60 [--every 10]
"""

import json
import os

os.environ.setdefault(
    "THP_MEM_ALLOC_ENABLE", "1"
)  # before torch: the loop allocates as the job's workers do (training_worker_env)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # bars redraw from the driver during the steps

import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path

from pipelines.distill import HUGE_PAGES_ENV, DistillJob, distill, label_rows, split_ids
from pipelines.options import CorpusOptions
from pipelines.precompute import PrecomputeOptions, precompute_embeddings
from pipelines.runtime import init_ray
from pipelines.storage.embeddings import load_embeddings
from pipelines.storage.files import read_table
from tinysam import build_sam
from tinysam.distill import DistillConfig, Distiller, init_student_decoder
from tinysam.distill.distiller import match_embedding_statistics
from tinysam_samples import ALL_PHOTOS, SAMPLE_PHOTOS, write_pseudo_labelled_shard

METHOD = {"lr": 5e-3, "warmup_steps": 2, "prompts": {"prompts_per_image": 16, "max_iterations": 3}}


def load_rows(embeddings: str) -> Dict[str, np.ndarray]:
    """Every image's training row (as the Ray Data stage makes it), in memory."""
    columns = ["image_id", "source", "source_offset", "source_length", "annotations"]
    table = read_table(embeddings, columns=columns)
    ids = table["image_id"].to_pylist()
    batch = {k: np.asarray(table[k].to_pylist(), dtype=object) for k in columns}
    stored_ids, stored = load_embeddings(embeddings)
    batch["embedding"] = stored[[stored_ids.index(i) for i in ids]].numpy()
    return label_rows(batch, max_masks=64)


def take(rows: Dict[str, np.ndarray], index: List[int]) -> Dict[str, np.ndarray]:
    return {k: v[index] for k, v in rows.items()}


def new_distiller(rows: Dict[str, np.ndarray], student_type: str, steps: int) -> Distiller:
    """Student and teacher as the job's workers make them (seeded)."""
    torch.manual_seed(0)
    teacher = build_sam("vit_t", "mobile_sam")
    student = build_sam(student_type)
    init_student_decoder(student, teacher)
    match_embedding_statistics(student, torch.as_tensor(rows["embedding"][:1]))
    return Distiller(student, teacher, DistillConfig.from_dict(METHOD), steps)


def in_process(embeddings: str, student_type: str, steps: int) -> dict:
    """The loop on the job's training images (its held-out split left out: images differ in step cost)."""
    rows = load_rows(embeddings)
    ids = list(rows["image_id"])
    rows = take(rows, [ids.index(i) for i in split_ids(ids, DistillJob.val_fraction)[0]])
    n = len(rows["image_id"])
    distiller = new_distiller(rows, student_type, steps)
    seen = []
    for i in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds = distiller.train_step(take(rows, [i % n]))["step_seconds"]
        after = resource.getrusage(resource.RUSAGE_SELF)
        seen.append((seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    seconds, faults, kernel = (statistics.median(x) for x in zip(*seen[1:]))  # the first step warms up
    return {"step_seconds": seconds, "minor_faults": faults, "kernel_seconds": kernel}


DATA_HELP = (
    "keep the labelled photos and their embeddings here, reused by a later run with the same photos "
    "(of this benchmark or huge_pages.py)"
)


def prepare(work: Path, photos: Tuple[str, ...], threads: int, points_per_side: int = 8) -> str:
    """The photos with pseudo labels from the real vit_t's everything mode at `points_per_side`,
    through the precompute job: its output folder. What an earlier run left in `work` for the
    same photos and grid is reused (labelling and the precompute job are most of a short run)."""
    made = work / "prepared.json"
    key = {"photos": list(photos), "points_per_side": points_per_side}
    if made.exists() and json.loads(made.read_text()) == key:
        return str(work / "emb")
    shutil.rmtree(work / "emb", ignore_errors=True)
    teacher = build_sam("vit_t", "mobile_sam")
    shard = write_pseudo_labelled_shard(work / "sa1b", teacher, photos, points_per_side=points_per_side)
    init_ray(num_cpus=threads + 2, dashboard=True)
    precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(shard), output=str(work / "emb"), batch_size=4, num_cpus_per_actor=threads),
            teacher="vit_t",
            checkpoint="mobile_sam",
        )
    )
    made.write_text(json.dumps(key))
    return str(work / "emb")


def learning_curve(embeddings: str, student_type: str, steps: int, every: int, val_fraction: float = 0.2) -> None:
    """Print a table of the held-out mIoU against the teacher over a run (see the module's doc)."""
    rows = load_rows(embeddings)
    ids = list(rows["image_id"])
    train_ids, val_ids = split_ids(ids, val_fraction)
    train, val = [ids.index(i) for i in train_ids], [ids.index(i) for i in val_ids]
    distiller = new_distiller(take(rows, train), student_type, steps)

    def evaluate() -> float:
        return distiller.evaluate([take(rows, [i]) for i in val])["miou_vs_teacher"]

    print(
        f"{student_type} from scratch, vit_t teacher, {len(train)} training / {len(val)} held-out photos, "
        f"batch 1, {torch.get_num_threads()} threads"
    )
    print("| step | loss (mean since last row) | embedding L1 | held-out mIoU(student, teacher) | seconds |")
    print("|---|---|---|---|---|")
    order, start, window = np.random.default_rng(0), time.perf_counter(), []
    distiller.recompute_bn_statistics(take(rows, [train[0]]))  # judged as every later row (as the job does)
    print(f"| 0 | - | - | {evaluate():.4f} | 0 |", flush=True)
    for step in range(1, steps + 1):
        batch = take(rows, [train[order.integers(len(train))]])
        window.append(distiller.train_step(batch))
        if step % every == 0 or step == steps:
            distiller.recompute_bn_statistics(batch)
            print(
                f"| {step} | {np.mean([m['loss'] for m in window]):.3f} | {window[-1]['embedding']:.4f} | "
                f"{evaluate():.4f} | {time.perf_counter() - start:.0f} |",
                flush=True,
            )
            window = []


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--student", default="vit_t_mini")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--curve", type=int, metavar="STEPS", help="held-out mIoU over a run of STEPS steps instead")
    parser.add_argument("--every", type=int, default=10, help="--curve: steps between evaluations")
    parser.add_argument("--data", metavar="DIR", help=DATA_HELP)
    args = parser.parse_args()
    if args.smoke:  # both parts, on two photos: the curve for 2 steps, then 2 steps against Ray Train
        args.steps, args.every, args.threads = 2, 1, 1
        METHOD["prompts"] = {"prompts_per_image": 4, "max_iterations": 1}  # cheap steps
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tinysam-bench-"))
    try:
        photos = SAMPLE_PHOTOS[:2] if args.smoke else ALL_PHOTOS if args.curve else SAMPLE_PHOTOS[:4]
        embeddings = prepare(Path(args.data or work / "data"), photos, args.threads, 4 if args.smoke else 8)
        if args.smoke:
            learning_curve(embeddings, args.student, 2, 1, val_fraction=0.5)
        elif args.curve:
            learning_curve(embeddings, args.student, args.curve, args.every)
            return
        # the loop runs before and after the Ray run (the machine drifts): its mean is the baseline
        before = in_process(embeddings, args.student, args.steps)
        job = DistillJob(
            embeddings=embeddings,
            teacher_checkpoint="mobile_sam",
            student=args.student,
            num_workers=1,
            cpus_per_worker=args.threads,
            steps=args.steps,
            checkpoint_every=args.steps,
            storage_path=str(work / "runs"),
            name="bench",
            distill=METHOD,
        )
        summary = distill(job)
        after = before if args.smoke else in_process(embeddings, args.student, args.steps)  # smoke: one loop
        loop = (before["step_seconds"] + after["step_seconds"]) / 2
        ray_step = 1 / summary.images_per_second  # median of (step + wait for data), one image per step
        print(
            f"{args.steps} steps, {args.student} student, vit_t teacher, 1 worker, {args.threads} threads, batch 1, "
            f"{HUGE_PAGES_ENV}={os.environ[HUGE_PAGES_ENV]} in both"
        )
        print(
            f"  in-process loop : {loop:.3f} s/step = {1 / loop:.3f} student images/s "
            f"(before {before['step_seconds']:.3f}, "
            f"after {after['step_seconds']:.3f}); per step {after['minor_faults']:.0f} minor page "
            f"faults, {after['kernel_seconds']:.2f} s in the kernel"
        )
        print(
            f"  Ray Train       : {ray_step:.3f} s/step = {1 / ray_step:.3f} student images/s (median, data wait "
            "included), compute alone "
            f"{summary.step_seconds:.3f} s/step; data wait {100 * summary.data_wait_fraction:.1f}% of step time"
        )
        print(f"overhead Ray / loop: {100 * (ray_step / loop - 1):+.1f}%  (goal <= 10%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
