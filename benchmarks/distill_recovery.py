"""Does distillation bring a damaged student back to its teacher? The recovery experiment, through
the real jobs.

Teacher: the real `vit_t` (`--checkpoint`, mobile_sam.pt), standing in for SAM-H. Student: the same
weights with the last TinyViT stage and the neck re-initialised (`--reinit` names other parts:
add `image_encoder.layers.2.` to start further from the teacher). Training data: augmented views
(random resized crops, flips, colour jitter) of scikit-image's photos, never the held-out ones,
pseudo-labelled by the teacher's everything mode in an SA-1B tar shard. `jobs/precompute_embeddings.py`
stores the teacher's embeddings; `jobs/distill.py --student-checkpoint` trains for about
`--minutes`, keeping a checkpoint every `--every` steps (copied aside as Ray Train registers it).
Then each checkpoint's student is judged on the held-out photos (`--eval-images`, else four
scikit-image photos left out of training): the box-prompt and 1-point mIoU of its masks against
the teacher's (prompts from the teacher's everything-mode masks), and, before and after,
everything-mode agreement with the teacher on the first photo.

    python benchmarks/distill_recovery.py --minutes 15 --checkpoint mobile_sam [--eval-images DIR] [--reinit PREFIX ...]

Prints the curve as a Markdown table; the last line is a JSON object (before_box_miou,
after_box_miou, before_point_miou, after_point_miou, everything agreement, steps, minutes, curve).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path
from PIL import Image, ImageEnhance

from tinysam import SamAutomaticMaskGenerator, SamPredictor, build_sam, save_checkpoint
from tinysam.eval import first_point
from tinysam.transforms import to_rgb_uint8
from tinysam.utils.metrics import best_match_ious
from tinysam.utils.sa1b import sa1b_document, write_sa1b_shard
from tinysam_samples import ALL_PHOTOS, sample_images

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = ("camera", "coins", "rocket", "hubble_deep_field")
REINITIALISED = ("image_encoder.layers.3.", "image_encoder.neck.")  # the last TinyViT stage, the neck


def damaged_student(
    checkpoint: str, path: Path, start_image: np.ndarray, reinitialised: Tuple[str, ...] = REINITIALISED, seed: int = 0
) -> Path:
    """The teacher's weights with the parameters under the `reinitialised` prefixes taken from a
    freshly initialised vit_t, started as
    the job starts a student from scratch: the neck's last LayerNorm at the per-channel mean and
    spread of the teacher's embedding of a training image (without it a fresh LayerNorm's output
    is ~10x the teacher's, and Adam at lr 1e-3 needs ~1000 steps to shrink it: a first run stayed
    at box mIoU < 0.01 for 175 steps)."""
    from tinysam.distill.distiller import match_embedding_statistics
    from tinysam.transforms import prepare_image

    teacher = build_sam("vit_t", checkpoint)
    state = teacher.state_dict()
    torch.manual_seed(seed)
    fresh = build_sam("vit_t").state_dict()
    for key in state:
        if key.startswith(reinitialised):
            state[key] = fresh[key]
    student = build_sam("vit_t")
    student.load_state_dict(state)
    with torch.no_grad():
        match_embedding_statistics(student, teacher.image_encoder(prepare_image(start_image).tensor[None]))
    return save_checkpoint(student, path)


def augmented_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random resized crop (30-100% of the area, aspect 3:4-4:3), a flip and colour jitter."""
    h, w = image.shape[:2]
    area = rng.uniform(0.3, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = min(h, int(round(np.sqrt(area / aspect)))), min(w, int(round(np.sqrt(area * aspect))))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    view = Image.fromarray(image[y : y + ch, x : x + cw])
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhance(view).enhance(rng.uniform(0.7, 1.3))
    return np.asarray(view)


def training_shard(
    teacher, photos: Tuple[str, ...], views: int, folder: Path, seed: int = 0, points_per_side: int = 8
) -> Path:
    """`views` augmented views of `photos`, pseudo-labelled by the teacher (everything mode at
    `points_per_side`), as one SA-1B tar shard."""
    import io

    rng = np.random.default_rng(seed)
    images = [to_rgb_uint8(img, name) for name, img in sample_images(photos)]
    generator = SamAutomaticMaskGenerator(teacher, points_per_side=points_per_side, output_mode="coco_rle")
    items = []
    for n in range(1, views + 1):
        view = augmented_view(images[rng.integers(len(images))], rng)
        buf = io.BytesIO()
        Image.fromarray(view).save(buf, format="JPEG", quality=92)
        records = generator.generate(view)
        items.append((n, buf.getvalue(), sa1b_document(str(n), f"sa_{n}.jpg", view.shape[1], view.shape[0], records)))
    return write_sa1b_shard(folder / "sa_000000.tar", items)


def run_job(args: List[str], env: Dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{out[-3000:]}")
    summaries = [line[8:] for line in out.splitlines() if line.startswith("SUMMARY ")]
    return json.loads(summaries[-1]) if summaries else {}


def copy_checkpoints(run: Path, into: Path, stop: threading.Event) -> threading.Thread:
    """Copy each checkpoint's student as it appears under the run's folder (the job keeps only its
    last two); a file still being written is read on the next look."""

    def watch() -> None:
        into.mkdir(parents=True, exist_ok=True)
        seen = set()
        while not stop.is_set():
            for state in sorted(run.glob("**/state.pt")) if run.exists() else []:
                if state in seen:
                    continue
                try:
                    saved = torch.load(state, weights_only=True)
                    torch.save(saved["student"], into / f"step_{saved['step']:06d}.pt")
                    seen.add(state)
                except Exception:  # being written, or already deleted: the next look decides
                    pass
            stop.wait(2.0)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


class HeldOut:
    """The held-out photos with the teacher's answers, computed once: its everything-mode masks
    give the prompts (a box and the interior point of each), its box and point masks are the
    reference."""

    def __init__(self, teacher, images: List[np.ndarray], max_prompts: int = 32, points_per_side: int = 16) -> None:
        self.images, self.prompts, self.reference = images, [], []
        self.points_per_side = points_per_side
        generator = SamAutomaticMaskGenerator(teacher, points_per_side=points_per_side)
        for image in images:
            masks = sorted(generator.generate(image), key=lambda r: -r["area"])[:max_prompts]
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in masks)], float)
            points = np.array([first_point(r["segmentation"]) for r in masks], float)
            self.prompts.append((boxes, points))
            self.reference.append(self.answer(teacher, image, boxes, points))
        self.everything = self.everything_masks(teacher)

    @staticmethod
    def answer(sam, image, boxes, points) -> Tuple[np.ndarray, np.ndarray]:
        predictor = SamPredictor(sam)
        predictor.set_image(image)
        box_masks = predictor.predict(box=boxes, multimask_output=False)[0][:, 0]
        point_masks = []
        for point in points:
            masks, scores, _ = predictor.predict(point_coords=point[None], point_labels=np.array([1]))
            point_masks.append(masks[np.argmax(scores)])
        return box_masks, np.stack(point_masks)

    def miou(self, sam) -> Dict[str, float]:
        box, point = [], []
        for image, (boxes, points), (ref_box, ref_point) in zip(self.images, self.prompts, self.reference):
            got_box, got_point = self.answer(sam, image, boxes, points)
            box += [_iou(a, b) for a, b in zip(got_box, ref_box)]
            point += [_iou(a, b) for a, b in zip(got_point, ref_point)]
        return {"box_miou": float(np.mean(box)), "point_miou": float(np.mean(point))}

    def everything_masks(self, sam) -> List[np.ndarray]:
        """Everything mode on the first photo, at twice the prompts' grid (32x32: the default)."""
        generator = SamAutomaticMaskGenerator(sam, points_per_side=2 * self.points_per_side)
        return [r["segmentation"] for r in generator.generate(self.images[0])]

    def everything_agreement(self, sam) -> Tuple[float, int]:
        """For each of the teacher's masks the best IoU among the student's, averaged; and how many
        masks the student's everything mode kept (0: none passed its filters)."""
        masks = self.everything_masks(sam)
        return float(best_match_ious(self.everything, masks).mean()), len(masks)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def held_out_images(folder) -> Tuple[List[str], List[np.ndarray]]:
    if folder is None:
        return list(HELD_OUT), [to_rgb_uint8(img, name) for name, img in sample_images(HELD_OUT)]
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"{folder}: no .jpg or .png photos to hold out")
    return [p.stem for p in paths], [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--checkpoint", default="mobile_sam", help="the teacher (vit_t weights)")
    parser.add_argument("--eval-images", help="folder of held-out photos (default: four scikit-image photos)")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time, start-up excluded")
    parser.add_argument("--every", type=int, default=25, help="steps between checkpoints (the curve's points)")
    parser.add_argument("--views", type=int, default=192, help="augmented training views")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--prompts-per-image", type=int, default=8, help="prompts per training image (the job's default: 64)"
    )
    parser.add_argument("--max-iterations", type=int, default=2, help="hard prompt sampling iterations, at most")
    parser.add_argument(
        "--train-all",
        action="store_true",
        help="train the whole student (default: only the re-initialised part, --train-only in the job)",
    )
    parser.add_argument(
        "--reinit",
        nargs="+",
        default=list(REINITIALISED),
        metavar="PREFIX",
        help="parameter prefixes of the teacher re-initialised in the student (default: the last stage and the neck)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    reinitialised = tuple(args.reinit)
    if args.smoke:  # two steps on two views; one held-out crop, four prompts
        args.minutes, args.every, args.views, args.prompts_per_image, args.max_iterations = 0.01, 2, 2, 2, 1
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tinysam-recovery-"))
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    try:
        teacher = build_sam("vit_t", args.checkpoint)
        names, images = held_out_images(args.eval_images)
        training = tuple(p for p in ALL_PHOTOS if p not in names)
        print(f"held out: {', '.join(names)}; training views of {len(training)} photos", flush=True)
        started = time.perf_counter()
        shard = training_shard(teacher, training, args.views, work / "sa1b", points_per_side=4 if args.smoke else 8)
        start_image = to_rgb_uint8(sample_images(training[:1])[0][1], training[0])  # a training photo
        init = damaged_student(args.checkpoint, work / "student_init.pth", start_image, reinitialised)
        run_job(
            ["jobs/precompute_embeddings.py", "--input", str(shard.parent), "--output", str(work / "emb")]
            + ["--teacher", "vit_t", "--checkpoint", args.checkpoint, "--num-cpus", str(args.threads + 1)],
            env,
        )
        held = HeldOut(teacher, [images[0][:256, :256]], 4, 4) if args.smoke else HeldOut(teacher, images)
        print(f"data, embeddings and the teacher's answers: {time.perf_counter() - started:.0f} s", flush=True)

        # Steps for the time given, from one step of the same student in this process
        from tinysam.distill import DistillConfig, Distiller, PromptConfig

        student = build_sam("vit_t", str(init))
        prompts = PromptConfig(prompts_per_image=args.prompts_per_image, max_iterations=args.max_iterations)
        train_only = () if args.train_all else reinitialised
        probe = Distiller(student, teacher, DistillConfig(prompts=prompts, train_only=train_only), total_steps=2)
        rows = _probe_rows(work / "emb", args.threads)
        probe.train_step(rows)
        step_seconds = probe.train_step(rows)["step_seconds"]
        steps = max(args.every, int(args.minutes * 60 / step_seconds))
        print(f"{step_seconds:.2f} s a step here: {steps} steps for {args.minutes:g} minutes", flush=True)

        runs, curve_dir, stop = work / "runs", work / "curve", threading.Event()
        watcher = copy_checkpoints(runs / "recovery", curve_dir, stop)
        trained = time.perf_counter()
        summary = run_job(
            ["jobs/distill.py", "--embeddings", str(work / "emb"), "--teacher-checkpoint", args.checkpoint]
            + ["--student", "vit_t", "--student-checkpoint", str(init), "--num-workers", "1"]
            + ["--cpus-per-worker", str(args.threads), "--num-cpus", str(args.threads + 1)]
            + ["--steps", str(steps), "--checkpoint-every", str(args.every), "--lr", str(args.lr)]
            + ["--prompts-per-image", str(args.prompts_per_image), "--max-iterations", str(args.max_iterations)]
            + (["--train-only", *train_only] if train_only else [])
            + ["--warmup-steps", str(min(20, steps // 10)), "--val-fraction", "0.05"]
            + ["--storage-path", str(runs), "--name", "recovery", "--export", str(work / "student.pth")],
            env,
        )
        minutes = (time.perf_counter() - trained) / 60
        time.sleep(3)
        stop.set()
        watcher.join()

        curve = [{"step": 0, **held.miou(build_sam("vit_t", str(init)))}]
        for path in sorted(curve_dir.glob("step_*.pt")):
            student = build_sam("vit_t")
            student.load_state_dict(torch.load(path, weights_only=True))
            curve.append({"step": int(path.stem[5:]), **held.miou(student.eval())})
        final = build_sam("vit_t", str(work / "student.pth"))
        if curve[-1]["step"] != summary.get("steps", steps):  # the exported student: the last point
            curve.append({"step": summary.get("steps", steps), **held.miou(final)})
        (before, masks_before), (after, masks_after) = (
            held.everything_agreement(build_sam("vit_t", str(init))),
            held.everything_agreement(final),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trained_part = "the whole student" if args.train_all else "the re-initialised part"
    print(
        f"\nvit_t, {' '.join(reinitialised)} re-initialised, {trained_part} trained; {len(training)} training photos, "
        f"{args.views} views, {args.prompts_per_image} prompts per view, lr {args.lr}"
    )
    print("| step | box-prompt mIoU vs teacher | 1-point mIoU vs teacher |\n|---|---|---|")
    for row in curve:
        print(f"| {row['step']} | {row['box_miou']:.4f} | {row['point_miou']:.4f} |")
    print(
        f"everything-mode agreement with the teacher on {names[0]}: {before:.4f} -> {after:.4f} "
        f"(masks kept: teacher {len(held.everything)}, student {masks_before} -> {masks_after})"
    )
    result = {
        "before_box_miou": curve[0]["box_miou"],
        "after_box_miou": curve[-1]["box_miou"],
        "before_point_miou": curve[0]["point_miou"],
        "after_point_miou": curve[-1]["point_miou"],
        "everything_agreement_before": before,
        "everything_agreement_after": after,
        "everything_masks": {"teacher": len(held.everything), "before": masks_before, "after": masks_after},
        "reinitialised": list(reinitialised),
        "steps": summary.get("steps", steps),
        "minutes": round(minutes, 2),
        "held_out": names,
        "curve": curve,
    }
    print(json.dumps(result))


def _probe_rows(embeddings: Path, threads: int) -> dict:
    """One training row of the stored embeddings, as the job's data stage makes it."""
    from pipelines.distill import label_rows
    from pipelines.storage.embeddings import load_embeddings
    from pipelines.storage.files import read_table

    columns = ["image_id", "source", "source_offset", "source_length", "annotations"]
    table = read_table(str(embeddings), columns=columns).slice(0, 1)
    batch = {k: np.asarray(table[k].to_pylist(), dtype=object) for k in columns}
    ids, stored = load_embeddings(str(embeddings), [batch["image_id"][0]])
    batch["embedding"] = stored.numpy()
    return label_rows(batch, max_masks=64)


if __name__ == "__main__":
    main()
