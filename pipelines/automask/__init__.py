"""Bulk auto-masking with Ray Data: images -> everything-mode actors -> SA-1B-style masks in Parquet.

Stages, top to bottom:
  plan_inputs (driver)       -> files and shards not yet done (pipelines/reading.py)
  read + prepare (CPU)       -> the precompute job's reading and preprocessing (one pass per shard);
  or load_stored_embeddings  -> rows of a precompute job's output, when the encoder already ran (stored.py)
  AutoMasker (pool)          -> the model loaded once per actor: encoder in batches, then everything
                                mode over the batch's images together (worker.py)
  write_batch (CPU)          -> ~128 MiB atomic Parquet files (pipelines/storage/masks.py; + SA-1B JSON
                                per image); audit and errors tables (exports.py)
After the run, from the Parquet output: a COCO results file and overlay PNGs (exports.py).

The package is cut where the Ray worker starts: `job.py` runs on the driver, `worker.py` in the
model actors (torch at the top), `exports.py` and `stored.py` in CPU tasks, which import no torch.
"""

from .exports import write_batch, write_coco_results, write_previews
from .job import AutomaskSummary, automask
from .options import AuditOptions, AutomaskOptions

__all__ = [
    "AuditOptions",
    "AutomaskOptions",
    "AutomaskSummary",
    "automask",
    "write_batch",
    "write_coco_results",
    "write_previews",
]
