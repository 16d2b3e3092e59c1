"""Distil a student SAM on Ray Train from a precompute job's teacher embeddings.

Stages, top to bottom:
  embeddings Parquet (driver)  -> split ids into train / held-out (stable under new images)
  label_rows (Ray Data, CPU)   -> the image through the one preprocessing path, its SA-1B masks as
                                  256x256 targets, the stored teacher embedding
  TorchTrainer workers         -> `tinysam.distill.Distiller` steps under DDP (gloo on CPU, nccl on
                                  GPU), a shard of the training rows each; checkpoints and metrics
                                  through `ray.train.report` to `storage_path`
  driver                       -> the final student exported in the official checkpoint layout,
                                  and a table of the run
"""

import hashlib
import json
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .reading import prepare_images, read_sources
from .stages import ok_rows
from .storage.embeddings import made_by, read_table, require_made_by

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
# PyTorch's transparent huge pages for CPU buffers of 2 MB and more. A CPU training step frees and
# reallocates its large activations; glibc hands them back to the kernel, and with 4 KB pages they
# fault back in page by page: measured on vit_t_mini at 1024x1024, 1.7 M minor faults per step and
# about 40% of the step's CPU time in the kernel; with huge pages 16x fewer faults and steps 10-20%
# faster. Inference gained nothing from it (measured), so only the training workers get it.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def worker_env() -> Dict[str, str]:
    """Environment of the training workers: huge pages on unless the caller's environment sets the variable."""
    return {HUGE_PAGES_ENV: os.environ.get(HUGE_PAGES_ENV, "1")}


@dataclass
class DistillJob:
    """Everything a distillation run needs; `distill` is the `tinysam.distill.DistillConfig` as a dict."""

    embeddings: str
    teacher_checkpoint: Optional[str]
    student: str = "vit_t"
    student_checkpoint: Optional[str] = None
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    batch_size: int = 1  # images per worker per step
    epochs: int = 8
    steps: Optional[int] = None  # overrides epochs
    checkpoint_every: Optional[int] = None  # steps; default: once per epoch
    storage_path: str = "distill_runs"
    name: str = "distill"
    resume: bool = False
    max_failures: int = 2
    val_fraction: float = 0.05
    max_masks: int = 64  # labelled masks kept per image (largest first)
    cache: Optional[bool] = None  # keep the prepared rows in Ray's object store across epochs (default: <= 256 images)
    eval_points: int = 16
    export: Optional[str] = None
    distill: Dict[str, Any] = field(default_factory=dict)
    storage_options: Optional[dict] = None


@dataclass
class DistillSummary:
    steps: int
    images_seen: int
    restarts: List[int]  # steps the run resumed from after a failure or --resume
    checkpoint: str
    export: Optional[str]
    miou_start: float
    miou_end: float
    loss_start: float
    loss_end: float
    images_per_second: float
    step_seconds: float  # median compute time of a step (data wait and reports excluded)
    data_wait_fraction: float
    table: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def split_ids(ids: Sequence[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Held-out ids by a hash of the id: adding images never moves an image between splits.
    At least one image is held out (and one kept) when there are two or more."""
    ids = sorted(ids)
    score = {i: int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in ids}
    val = [i for i in ids if score[i] < val_fraction]
    if not val and len(ids) > 1 and val_fraction > 0:
        val = [min(ids, key=score.get)]
    if len(val) == len(ids):
        val = val[:-1]
    train = [i for i in ids if i not in set(val)]
    return train, val


def label_rows(batch: Dict[str, np.ndarray], max_masks: int, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Ray Data stage: each row's image prepared as in every job and its labelled masks as
    (max_masks, 256, 256) uint8 targets. Unreadable images are dropped (the precompute job
    already reported them)."""
    from tinysam.distill.data import LOW_RES, label_masks

    batch = {k: np.asarray(v) for k, v in batch.items()}
    # tar members by their stored byte range: one ranged read per image, never the shard
    prepared = prepare_images(read_sources({k: batch[k] for k in ("image_id", "source", "source_offset",
                                                                    "source_length")}, storage_options))
    ok = ok_rows(prepared)
    gt = np.zeros((len(ok), max_masks, LOW_RES, LOW_RES), np.uint8)
    count = np.zeros(len(ok), np.int32)
    for i in np.flatnonzero(ok):
        annotations = batch["annotations"][i] or prepared["annotations"][i]
        masks = label_masks(annotations, (prepared["orig_h"][i], prepared["orig_w"][i]),
                            (prepared["input_h"][i], prepared["input_w"][i]), max_masks)
        gt[i, :len(masks)] = masks
        count[i] = len(masks)
    return {"image_id": batch["image_id"][ok], "pixels": prepared["pixels"][ok],
            "input_h": prepared["input_h"][ok], "input_w": prepared["input_w"][ok],
            "embedding": np.stack(list(batch["embedding"][ok])) if ok.any() else np.zeros((0, 256, 64, 64), np.float16),
            "gt": gt[ok], "gt_count": count[ok]}


def labelled_split(ids: List[str], files: List[str], max_masks: int, filesystem=None,
                   storage_options: Optional[dict] = None):
    """The rows of `ids` from the embeddings Parquet `files`, through `label_rows` (a lazy Ray
    dataset). Ray Data pushes the columns and the id filter down into the Parquet read (one read
    operator in the optimised plan): each split decodes only its own rows' embeddings."""
    rows = stored_rows(ids, files, ["image_id", "source", "source_offset", "source_length", "embedding", "annotations"],
                       filesystem)
    return rows.map_batches(label_rows, fn_kwargs={"max_masks": max_masks, "storage_options": storage_options},
                            batch_size=8)


def stored_rows(ids: List[str], files: List[str], columns: List[str], filesystem=None):
    """The stored rows of `ids`, these columns only (both pushed down into the Parquet read)."""
    import ray.data
    from ray.data.expressions import col

    return (ray.data.read_parquet(files, filesystem=filesystem).select_columns(columns)
            .filter(expr=col("image_id").is_in(ids)))


def teacher_of(embeddings: str, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Ids, teacher type and checkpoint hash of a precompute job's output (no embeddings read)."""
    teacher, sha = made_by(embeddings, storage_options)
    ids = read_table(embeddings, columns=["image_id"], storage_options=storage_options)["image_id"].to_pylist()
    return {"ids": ids, "teacher": teacher, "sha256": sha}


def check_teacher(info: Dict[str, Any], embeddings: str, teacher_checkpoint: Optional[str],
                  storage_options: Optional[dict] = None) -> None:
    """The teacher's decoder must be the one whose encoder made the embeddings."""
    from tinysam.weights import resolve_checkpoint, sha256_file

    sha = sha256_file(resolve_checkpoint(teacher_checkpoint)) if teacher_checkpoint else "random-init"
    require_made_by(embeddings, info["teacher"], sha, f"teacher checkpoint {teacher_checkpoint!r}", storage_options)


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """One Ray Train worker: build teacher and student, resume from the last checkpoint if there
    is one, step through this worker's shard, report metrics every step and a checkpoint (with the
    run's history and the held-out mIoU) every `checkpoint_every` steps."""
    import ray.train
    import ray.train.torch
    import torch

    from tinysam import build_sam
    from tinysam.distill import DistillConfig, Distiller, init_student_decoder
    from tinysam.distill.distiller import match_embedding_statistics

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    if rank == 0 and config.get("log", True):
        print(f"worker 0 of {ctx.get_world_size()}: {device}, {config['threads']} threads, "
              f"{HUGE_PAGES_ENV}={os.environ.get(HUGE_PAGES_ENV)}", flush=True)
    teacher = build_sam(config["teacher"], config["teacher_checkpoint"])
    student = build_sam(config["student"], config["student_checkpoint"])
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size = config["batch_size"]
    checkpoint = ray.train.get_checkpoint()
    if not config["student_checkpoint"]:
        init_student_decoder(student, teacher)
        if checkpoint is None:  # start at the teacher's embedding scale (see match_embedding_statistics)
            match_embedding_statistics(student, torch.from_numpy(config["start_embedding"]))
    distiller = Distiller(
        student, teacher, DistillConfig.from_dict(config["distill"]), config["total_steps"], device,
        wrap=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True}))
    history: List[Dict[str, Any]] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            distiller.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), map_location=device, weights_only=True))
            with open(os.path.join(folder, HISTORY_FILE)) as f:
                history = json.load(f)
        history.append({"event": "resumed", "step": distiller.step})

    def evaluate() -> float:
        batches = val_shard.iter_batches(batch_size=batch_size, batch_format="numpy")
        return distiller.evaluate(batches, config["eval_points"])["miou_vs_teacher"]

    per_epoch, total = config["steps_per_epoch"], config["total_steps"]
    last = time.perf_counter()
    while distiller.step < total:
        epoch, skip = divmod(distiller.step, per_epoch)
        batches = shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=config["seed"] + epoch)
        for k, batch in enumerate(batches):
            if k < skip:  # resuming mid-epoch: these steps are in the checkpoint already
                last = time.perf_counter()
                continue
            if k >= per_epoch or distiller.step >= total:
                break
            waited = time.perf_counter() - last
            if distiller.step == 0 and rank == 0:
                # The untrained student, judged as every checkpoint is: BatchNorm statistics of a
                # training batch (precise BN), not a fresh model's running averages.
                distiller.recompute_bn_statistics(batch)
                history.append({"step": 0, "miou_vs_teacher": evaluate()})
            metrics = distiller.train_step(batch)
            metrics["images"] *= ctx.get_world_size()
            metrics.update(epoch=epoch, step=distiller.step, data_wait_seconds=waited,
                           images_per_second=metrics["images"] / (metrics["step_seconds"] + waited))
            save = distiller.step % config["checkpoint_every"] == 0 or distiller.step == total
            report_checkpoint = None
            if save:  # every rank: the BatchNorm statistics are part of the saved model
                distiller.recompute_bn_statistics(batch)
            if save and rank == 0:
                metrics["miou_vs_teacher"] = evaluate()
            if rank == 0:
                history.append(metrics)
            if save and rank == 0:
                folder = tempfile.mkdtemp(prefix="tinysam-ckpt-")
                torch.save(distiller.state_dict(), os.path.join(folder, STATE_FILE))
                with open(os.path.join(folder, HISTORY_FILE), "w") as f:
                    json.dump(history, f)
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=report_checkpoint)
            _fault_injection(config.get("kill_worker_at"), distiller.step, rank)
            if rank == 0 and config.get("log", True):
                print(f"step {distiller.step}/{total} loss {metrics['loss']:.4f} "
                      + " ".join(f"{k} {metrics[k]:.4f}" for k in ("embedding", "token", "output", "focal", "dice", "iou"))
                      + f" {metrics['images_per_second']:.2f} img/s"
                      + (f" mIoU(student, teacher) {metrics['miou_vs_teacher']:.4f}" if "miou_vs_teacher" in metrics else ""),
                      flush=True)
            last = time.perf_counter()


def _fault_injection(spec: Optional[str], step: int, rank: int) -> None:
    """For failure drills: TINYSAM_KILL_WORKER_AT=<step>:<rank>:<marker file> in the driver's
    environment (passed to the workers in their config) makes that worker SIGKILL itself once,
    right after that step's report (the marker keeps the restart alive)."""
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who) and not os.path.exists(marker):
        open(marker, "w").close()
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _storage(job: DistillJob):
    """RunConfig storage arguments: a local path, or a URL through the same fsspec filesystem as
    every other job's storage (so s3:// honours the same settings, e.g. AWS_ENDPOINT_URL)."""
    if "://" in job.storage_path:
        import pyarrow.fs as pafs

        from .sources import filesystem

        fs, path = filesystem(job.storage_path, job.storage_options)
        return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return os.path.abspath(job.storage_path), None


def run_exists(job: DistillJob) -> bool:
    from .sources import filesystem

    fs, path = filesystem(job.storage_path, job.storage_options)
    return fs.exists(posixpath.join(path, job.name))


def check_job(job: DistillJob) -> Tuple[Dict[str, Any], List[str], List[str], int]:
    """Everything that can be refused before Ray starts: the embeddings and their teacher, the
    student checkpoint, the method's configuration, an existing run without `resume`, too few
    images. Returns (teacher info, train ids, held-out ids, steps per epoch)."""
    from tinysam.distill import DistillConfig

    info = teacher_of(job.embeddings, job.storage_options)
    check_teacher(info, job.embeddings, job.teacher_checkpoint, job.storage_options)
    if job.student_checkpoint:
        from tinysam.build_sam import check_checkpoint

        check_checkpoint(job.student, job.student_checkpoint)
    DistillConfig.from_dict(job.distill)
    if run_exists(job) and not job.resume:
        raise FileExistsError(f"{job.storage_path}/{job.name} exists: pass --resume to continue it, or a new --name")
    train_ids, val_ids = split_ids(info["ids"], job.val_fraction)
    per_epoch = len(train_ids) // (job.batch_size * job.num_workers)
    if per_epoch == 0:
        raise ValueError(f"{len(train_ids)} training images cannot fill one step of {job.num_workers} workers x "
                         f"batch {job.batch_size}")
    return info, train_ids, val_ids, per_epoch


def distill(job: DistillJob, checked: Optional[Tuple[Dict[str, Any], List[str], List[str], int]] = None) -> DistillSummary:
    """Run (or, with `job.resume`, continue) a distillation run. Ray must be initialised by the caller.
    `checked`: what `check_job(job)` returned, when the caller ran it already (it hashes the checkpoint)."""
    import torch
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tinysam import build_sam

    info, train_ids, val_ids, per_epoch = checked or check_job(job)
    total = job.steps or job.epochs * per_epoch
    from .storage.files import parquet_files

    files = parquet_files(job.embeddings, job.storage_options)
    fs = _read_filesystem(job)
    args = (files, job.max_masks, fs, job.storage_options)
    datasets = {"train": labelled_split(train_ids, *args), "val": labelled_split(val_ids, *args).materialize()}
    # A small set is prepared once instead of once per epoch (~10 MB per image in the object store).
    if job.cache or (job.cache is None and len(train_ids) <= 256):
        datasets["train"] = datasets["train"].materialize()
    start = None  # the scale an encoder from scratch starts at: a training image's embedding, never a held-out one's
    if not job.student_checkpoint:  # read here, not through Ray Data: a dataset's start-up costs seconds
        from .storage.embeddings import load_embeddings

        start = load_embeddings(job.embeddings, train_ids[:1], job.storage_options)[1].numpy()
    config = {
        "start_embedding": start,
        "teacher": info["teacher"], "teacher_checkpoint": job.teacher_checkpoint, "student": job.student,
        "student_checkpoint": job.student_checkpoint, "batch_size": job.batch_size, "threads": job.cpus_per_worker,
        "steps_per_epoch": per_epoch, "total_steps": total, "checkpoint_every": job.checkpoint_every or per_epoch,
        "eval_points": job.eval_points, "seed": job.distill.get("seed", 0), "distill": job.distill,
        "kill_worker_at": os.environ.get("TINYSAM_KILL_WORKER_AT"),
    }
    storage_path, storage_fs = _storage(job)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=RunConfig(name=job.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": worker_env()}),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {job.name} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(folder, HISTORY_FILE)) as f:
            history = json.load(f)
    student = build_sam(job.student)
    student.load_state_dict(state["student"], strict=True)
    exported = export_student(student, job.export, job.storage_options) if job.export else None
    summary = summarize(history, result.checkpoint.path, exported)
    _write_text(posixpath.join(storage_path if storage_fs is None else job.storage_path, job.name, "report.md"),
                summary.table, job.storage_options)
    return summary


def _read_filesystem(job: DistillJob):
    if "://" in job.embeddings:
        from .sources import filesystem

        return filesystem(job.embeddings, job.storage_options)[0]
    return None


def export_student(student, path: str, storage_options: Optional[dict] = None) -> str:
    """The student as a plain state dict in the official checkpoint layout (for `vit_t`, the
    439 keys of `mobile_sam.pt`), loadable with `weights_only=True`; written atomically."""
    import io

    import torch

    from .storage.files import write_bytes_atomic

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, buf)
    folder, name = posixpath.split(path) if "://" in path else os.path.split(os.path.abspath(path))
    write_bytes_atomic(buf.getvalue(), folder, name, storage_options)
    return path


def _write_text(path: str, text: str, storage_options: Optional[dict]) -> None:
    from .storage.files import write_bytes_atomic

    folder, name = posixpath.split(path)
    write_bytes_atomic(text.encode(), folder, name, storage_options)


def summarize(history: List[Dict[str, Any]], checkpoint: str, exported: Optional[str]) -> DistillSummary:
    """The run's summary and a Markdown table of its evaluations (one row per checkpoint)."""
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "miou_vs_teacher" in h]
    restarts = [h["step"] for h in history if h.get("event") == "resumed"]
    waits = sum(h["data_wait_seconds"] for h in steps)
    busy = sum(h["step_seconds"] for h in steps)
    rows = ["| step | loss | embedding | token | output | focal | dice | iou | mIoU(student, teacher) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for h in evals:
        terms = [f"{h[k]:.4f}" if k in h else "-" for k in ("loss", "embedding", "token", "output", "focal", "dice", "iou")]
        rows.append(f"| {h['step']} | " + " | ".join(terms) + f" | {h['miou_vs_teacher']:.4f} |")
    window = max(1, len(steps) // 4)
    return DistillSummary(
        steps=steps[-1]["step"] if steps else 0, images_seen=int(sum(h["images"] for h in steps)),
        restarts=restarts, checkpoint=str(checkpoint), export=exported,
        miou_start=evals[0]["miou_vs_teacher"] if evals else float("nan"),
        miou_end=evals[-1]["miou_vs_teacher"] if evals else float("nan"),
        loss_start=float(np.mean([h["loss"] for h in steps[:window]])) if steps else float("nan"),
        loss_end=float(np.mean([h["loss"] for h in steps[-window:]])) if steps else float("nan"),
        images_per_second=float(np.median([h["images_per_second"] for h in steps])) if steps else 0.0,
        step_seconds=float(np.median([h["step_seconds"] for h in steps])) if steps else 0.0,
        data_wait_fraction=waits / (waits + busy) if steps else 0.0,
        table="\n".join(rows) + "\n")
