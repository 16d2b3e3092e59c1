"""Precompute teacher image embeddings with Ray Data: images -> encoder actors -> Parquet.

Stages, top to bottom:
  plan_inputs (driver)   -> files and shards not yet done (pipelines/reading.py)
  read + prepare (CPU)   -> files, or one pass per tar shard; decode, resize + pad
  TeacherEncoder (pool)  -> the image encoder, loaded once per actor, autocast on GPU
  write_batch (CPU)      -> ~128 MiB atomic Parquet files (pipelines/storage/embeddings.py);
                            bad images to the errors table
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from .actors import SamActor
from .options import CorpusOptions
from .reading import plan_inputs
from .results import JobSummary, finish_summary, run_to_output
from .stages import ModelStage, image_pipeline, ok_rows, preflight
from .storage.embeddings import EMBEDDING_SHAPE, default_rows_per_file, write_embeddings
from .storage.errors import write_errors
from .storage.files import batch_file_name

DTYPES = ("float16", "float32")


class TeacherEncoder(SamActor):
    """Ray actor: loads the teacher once, encodes batches of prepared images."""

    def __init__(
        self,
        model_type: str,
        checkpoint: Optional[str],
        dtype: str = "float16",
        device: Optional[str] = None,
        cpu_threads: Optional[int] = None,
        memory_gb: Optional[float] = None,
        compile: bool = False,
    ) -> None:
        super().__init__(model_type, checkpoint, device, cpu_threads, memory_gb=memory_gb, compile=compile)
        self.sam.prompt_encoder = self.sam.mask_decoder = None  # only the encoder is used
        self.out_dtype = np.float16 if dtype == "float16" else np.float32

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        import torch

        ok = ok_rows(batch)
        emb = np.zeros((len(ok), *EMBEDDING_SHAPE), self.out_dtype)
        if ok.any():
            with torch.inference_mode():
                emb[ok] = self.encode(batch, np.flatnonzero(ok)).cpu().numpy().astype(self.out_dtype)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = emb
        return out


def write_batch(
    batch: Dict[str, np.ndarray], output: str, provenance: Dict[str, Any], storage_options: Optional[dict] = None
) -> Dict[str, Any]:
    """Write the batch's good rows as one Parquet file and its bad rows to the errors table."""
    ok = ok_rows(batch)
    ids = [str(i) for i in batch["image_id"]]
    name = batch_file_name(ids)
    written = write_embeddings(
        batch, ok, output, name, provenance["model"], provenance["checkpoint_sha256"], provenance, storage_options
    )
    write_errors(batch, ok, output, name, storage_options)
    per_row = np.where(ok, written // max(1, int(ok.sum())), 0)
    return {"image_id": np.asarray(ids), "source": batch["source"], "ok": ok, "bytes": per_row}


@dataclass
class PrecomputeSummary(JobSummary):
    @property
    def mib_per_image(self) -> float:
        return self.bytes_written / max(1, self.written) / 2**20

    def as_dict(self) -> Dict[str, Any]:
        return {**super().as_dict(), "mib_per_image": self.mib_per_image}


@dataclass(frozen=True)
class PrecomputeOptions:
    """A precompute run: the corpus and actors, the teacher, and how its embeddings are stored."""

    corpus: CorpusOptions
    teacher: str = "vit_h"  # model type of the teacher encoder
    checkpoint: Optional[str] = None  # None: random weights (tests); the job requires one
    dtype: str = "float16"  # stored embedding type
    compile: bool = False  # Inductor in each actor: minutes at the start, for GPU runs

    def __post_init__(self) -> None:
        if not self.corpus.input:
            raise ValueError("give an input: a folder, s3:// prefix, .txt list or SA-1B .tar shard(s)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")


def precompute_embeddings(options: PrecomputeOptions) -> PrecomputeSummary:
    """Embed every image of the corpus's input not yet in its output. Ray must be initialised by
    the caller."""
    corpus = options.corpus
    output, storage_options = corpus.output, corpus.storage_options
    checkpoint_sha = preflight(options.teacher, options.checkpoint, output, storage_options)
    provenance = {"model": options.teacher, "checkpoint_sha256": checkpoint_sha, "dtype": options.dtype}
    plan = plan_inputs(corpus.input, output, provenance, corpus.limit, corpus.overwrite, storage_options)
    summary = PrecomputeSummary()
    if plan.files or plan.shards:
        stage = ModelStage(
            TeacherEncoder,
            {
                "model_type": options.teacher,
                "checkpoint": options.checkpoint,
                "dtype": options.dtype,
                "memory_gb": corpus.actor_memory_gb,
                "compile": options.compile,
            },
            write_batch,
            {"output": output, "provenance": provenance},
            corpus.rows_per_file or default_rows_per_file(options.dtype),
        )
        run_to_output(image_pipeline(plan, stage, corpus), summary, output, corpus.max_failures)
    finish_summary(summary, plan, output, storage_options)
    return summary
