"""The auto-masking job's second input: a precompute job's stored embeddings instead of the encoder.

`pending_stored` (driver) plans the images not yet masked; `stored_embedding_rows` reads them as a lazy
dataset whose CPU tasks (`load_stored_embeddings`) fetch each batch's rows from the files that
hold them."""

from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa

from ..reading import Plan
from ..sources import ImageRef
from ..storage import embeddings as stored
from ..storage.provenance import resume_ids


def load_stored_embeddings(batch: Dict[str, np.ndarray], storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Rows of a precompute job's output for the batch's ids (read from the files that hold them)."""
    n = len(batch["image_id"])
    out: Dict[str, Any] = {k: np.zeros(n, np.int64) for k in ("orig_h", "orig_w", "input_h", "input_w")}
    embeddings: List[Optional[np.ndarray]] = [None] * n
    errors = [""] * n
    position = {str(i): k for k, i in enumerate(batch["image_id"])}
    for file in sorted(set(str(f) for f in batch["embedding_file"])):
        try:
            table = stored.read_rows(file, list(position), storage_options)
            values = table["embedding"].combine_chunks().to_numpy_ndarray()
            for j, image_id in enumerate(table["image_id"].to_pylist()):
                k = position[image_id]
                embeddings[k] = values[j]
                for key in ("orig_h", "orig_w", "input_h", "input_w"):
                    out[key][k] = table[key][j].as_py()
        except Exception as e:  # a damaged embeddings file fails its rows, not the run
            for k, f in enumerate(batch["embedding_file"]):
                if str(f) == file:
                    errors[k] = f"{file}: stored embeddings unreadable ({type(e).__name__}: {e})"
    shape = next((e.shape for e in embeddings if e is not None), stored.EMBEDDING_SHAPE)
    for k, e in enumerate(embeddings):
        if e is None and not errors[k]:
            errors[k] = f"{batch['source'][k]}: no stored embedding for id {batch['image_id'][k]}"
    out["embedding"] = np.stack([e if e is not None else np.zeros(shape, np.float16) for e in embeddings])
    keep = {k: batch[k] for k in ("image_id", "source", "source_offset", "source_length")}
    return {**keep, "error": np.array(errors), **out}


def pending_stored(
    embeddings: str,
    output: str,
    provenance: Dict[str, Any],
    limit: Optional[int],
    overwrite: bool,
    storage_options: Optional[dict],
):
    """(plan, {id: embeddings file}) for the images of a precompute job's output not yet masked;
    refuses embeddings of another model."""
    stored.require_made_by(
        embeddings, provenance["model"], provenance["checkpoint_sha256"], "this job's model", storage_options
    )
    index = stored.read_index(embeddings, storage_options).sort_by("source")
    index = index.slice(0, limit) if limit is not None else index
    done = resume_ids(output, provenance, overwrite, storage_options)
    ids = index["image_id"].to_pylist()
    finished = done.contains(ids) if ids else np.zeros(0, bool)
    todo = index.filter(pa.array(~finished))
    todo_ids = todo["image_id"].to_pylist()
    plan = Plan(
        files=[ImageRef(i, s) for i, s in zip(todo_ids, todo["source"].to_pylist())],
        done=done,
        skipped=int(finished.sum()),
        ranges=dict(zip(todo_ids, zip(todo["source_offset"].to_pylist(), todo["source_length"].to_pylist()))),
    )
    return plan, stored.files_by_id(embeddings, storage_options)


def stored_embedding_rows(plan: Plan, files: Dict[str, str], batch_size: int, storage_options: Optional[dict]):
    """The plan's images as rows of stored embeddings (a lazy Dataset)."""
    import ray

    items = [
        {
            "image_id": r.image_id,
            "source": r.source,
            "source_offset": plan.ranges[r.image_id][0],
            "source_length": plan.ranges[r.image_id][1],
            "embedding_file": files[r.image_id],
        }
        for r in plan.files
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    return ds.map_batches(
        load_stored_embeddings, batch_size=batch_size, num_cpus=0.5, fn_kwargs={"storage_options": storage_options}
    )
