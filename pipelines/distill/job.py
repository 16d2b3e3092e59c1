"""The distillation job on the driver: check the job before Ray starts, build the datasets, run
Ray Train's TorchTrainer, export the student and write the run's report."""

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..runtime import training_worker_env
from ..sources import arrow_filesystem, filesystem
from ..storage.files import parquet_files, write_bytes_atomic
from .data import PreparedOnce, check_teacher, labelled_split, split_ids, teacher_of
from .report import DistillSummary, summarize, write_text


@dataclass(frozen=True)
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
    cache: Optional[bool] = None  # prepare the rows once, into Ray's object store (default: <= 256 images)
    eval_points: int = 16
    export: Optional[str] = None
    distill: Dict[str, Any] = field(default_factory=dict)
    storage_options: Optional[dict] = None


def _storage(job: DistillJob):
    """RunConfig storage arguments: a local path, or a URL through the same fsspec filesystem as
    every other job's storage (so s3:// honours the same settings, e.g. AWS_ENDPOINT_URL)."""
    return arrow_filesystem(job.storage_path, job.storage_options)


def run_exists(job: DistillJob) -> bool:
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
        raise ValueError(
            f"{len(train_ids)} training images cannot fill one step of {job.num_workers} workers x "
            f"batch {job.batch_size}"
        )
    return info, train_ids, val_ids, per_epoch


def distill(
    job: DistillJob,
    checked: Optional[Tuple[Dict[str, Any], List[str], List[str], int]] = None,
) -> DistillSummary:
    """Run (or, with `job.resume`, continue) a distillation run. Ray must be initialised by the caller.
    `checked`: what `check_job(job)` returned, when the caller ran it already (it hashes the checkpoint)."""
    import torch
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tinysam import build_sam

    from .worker import HISTORY_FILE, STATE_FILE, train_loop_per_worker

    info, train_ids, val_ids, per_epoch = checked or check_job(job)
    total = job.steps or job.epochs * per_epoch
    files = parquet_files(job.embeddings, job.storage_options)
    fs = _read_filesystem(job)
    args = (files, job.max_masks, fs, job.storage_options)
    train, val = labelled_split(train_ids, *args), labelled_split(val_ids, *args)
    # A small set is prepared once instead of once per epoch (~10 MB per image in the object store),
    # until a restart: see PreparedOnce.
    cache = job.cache or (job.cache is None and len(train_ids) <= 256)
    datasets = {"train": PreparedOnce(train) if cache else train, "val": PreparedOnce(val)}
    start = None  # the scale an encoder from scratch starts at: a training image's embedding, never a held-out one's
    if not job.student_checkpoint:  # read here, not through Ray Data: a dataset's start-up costs seconds
        from ..storage.embeddings import load_embeddings

        start = load_embeddings(job.embeddings, train_ids[:1], job.storage_options)[1].numpy()
    config = {
        "start_embedding": start,
        "teacher": info["teacher"],
        "teacher_checkpoint": job.teacher_checkpoint,
        "student": job.student,
        "student_checkpoint": job.student_checkpoint,
        "batch_size": job.batch_size,
        "threads": job.cpus_per_worker,
        "steps_per_epoch": per_epoch,
        "total_steps": total,
        "checkpoint_every": job.checkpoint_every or per_epoch,
        "eval_points": job.eval_points,
        "seed": job.distill.get("seed", 0),
        "distill": job.distill,
    }
    storage_path, storage_fs = _storage(job)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": job.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": training_worker_env()},
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
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
    write_text(
        posixpath.join(storage_path if storage_fs is None else job.storage_path, job.name, "report.md"),
        summary.table,
        job.storage_options,
    )
    return summary


def _read_filesystem(job: DistillJob):
    if "://" in job.embeddings:
        return filesystem(job.embeddings, job.storage_options)[0]
    return None


def export_student(student, path: str, storage_options: Optional[dict] = None) -> str:
    """The student as a plain state dict in the official checkpoint layout (for `vit_t`, the
    439 keys of `mobile_sam.pt`), loadable with `weights_only=True`; written atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, buf)
    folder, name = posixpath.split(path) if "://" in path else os.path.split(os.path.abspath(path))
    write_bytes_atomic(buf.getvalue(), folder, name, storage_options)
    return path
