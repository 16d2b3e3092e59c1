"""SA-1B's on-disk layout: per-image JSON documents, and tar shards of `sa_N.jpg` + `sa_N.json`."""

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple


def sa1b_document(image_id: str, source: str, width: int, height: int, records: List[dict]) -> Dict[str, Any]:
    """One image's masks in SA-1B's per-image JSON layout."""
    return {
        "image": {"image_id": image_id, "width": width, "height": height, "file_name": source},
        "annotations": [{"id": k, **r} for k, r in enumerate(records)],
    }


def write_sa1b_shard(path: Path, items: Iterable[Tuple[int, bytes, Any]], encoded: bool = False) -> Path:
    """Write (number, JPEG bytes, document) items as an SA-1B tar shard, atomically; with `encoded`
    the documents are JSON bytes already."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".tar.part")
    with tarfile.open(part, "w") as tar:
        for n, jpeg, doc in items:
            text = doc if encoded else json.dumps(doc).encode()
            for member, payload in ((f"sa_{n}.jpg", jpeg), (f"sa_{n}.json", text)):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    os.replace(part, path)
    return path
