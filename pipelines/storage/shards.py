"""Shard manifests, `<output>/_shards/<hash>.parquet`: the image ids of a tar shard, written by the
task that read the shard to its end. A rerun skips a shard whose ids are all in the output without
opening it; without a manifest (the shard was never read to its end) the shard is read again and
its finished images are passed over by id."""

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ..sources import filesystem
from .files import PLAN_READERS, DoneIds, write_table_atomic

SHARDS_DIR = "_shards"
SHARD_KEY = b"tinysam.shard"


def manifest_name(shard: str) -> str:
    return f"{SHARDS_DIR}/{hashlib.sha1(shard.encode()).hexdigest()[:16]}.parquet"


def write_manifest(
    output: str, shard: str, image_ids: List[str], storage_options: Optional[Dict[str, Any]] = None
) -> None:
    """Record that `shard` holds `image_ids` (all of its images)."""
    table = pa.table({"image_id": pa.array(image_ids, pa.string())})
    table = table.replace_schema_metadata({SHARD_KEY: shard.encode()})
    write_table_atomic(table, output, manifest_name(shard), storage_options)


def read_manifest(output: str, shard: str, storage_options: Optional[Dict[str, Any]] = None) -> Optional[List[str]]:
    """The image ids of `shard`, or None when it was never read to its end."""
    fs, path = filesystem(output, storage_options)
    file = f"{path.rstrip('/')}/{manifest_name(shard)}"
    if not fs.exists(file):
        return None
    with fs.open(file, "rb") as f:
        return pq.read_table(f)["image_id"].to_pylist()


def shard_progress(
    output: str, shards: List[str], done: DoneIds, storage_options: Optional[Dict[str, Any]] = None
) -> Tuple[List[str], int]:
    """(shards still to read, images in the shards complete in the output), the manifests read
    PLAN_READERS at a time (SA-1B: ~1,000 of them, each a request or two on an object store) and
    at most that many in memory."""
    from concurrent.futures import ThreadPoolExecutor

    todo, complete_images = [], 0
    with ThreadPoolExecutor(PLAN_READERS) as pool:
        for start in range(0, len(shards), PLAN_READERS):
            window = shards[start : start + PLAN_READERS]
            for shard, ids in zip(window, pool.map(lambda s: read_manifest(output, s, storage_options), window)):
                if ids is not None and (not ids or done.contains(ids).all()):
                    complete_images += len(ids)
                else:
                    todo.append(shard)
    return todo, complete_images
