"""Distil a student SAM on Ray Train from a precompute job's teacher embeddings.

Stages, top to bottom:
  embeddings Parquet (driver)  -> split ids into train / held-out, stable under new images (data.py)
  label_rows (Ray Data, CPU)   -> the image through the one preprocessing path, its SA-1B masks as
                                  256x256 targets, the stored teacher embedding (data.py)
  TorchTrainer workers         -> `tinysam.distill.Distiller` steps under DDP (gloo on CPU, nccl on
                                  GPU), a shard of the training rows each; checkpoints and metrics
                                  through `ray.train.report` to `storage_path` (worker.py)
  driver                       -> the final student exported in the official checkpoint layout, and
                                  a table of the run (job.py, report.py)

`worker.py` (torch and Ray Train at the top) is imported only where the training runs.
"""

from ..runtime import HUGE_PAGES_ENV, training_worker_env
from .data import label_rows, labelled_split, split_ids
from .job import DistillJob, check_job, distill, export_student
from .report import DistillSummary, summarize

__all__ = [
    "HUGE_PAGES_ENV",
    "DistillJob",
    "DistillSummary",
    "check_job",
    "distill",
    "export_student",
    "label_rows",
    "labelled_split",
    "split_ids",
    "summarize",
    "training_worker_env",
]
