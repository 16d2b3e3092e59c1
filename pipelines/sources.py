"""Inputs shared by every job: list images (folder, s3:// prefix, list file, SA-1B tar shards),
give each a stable id, read its bytes and decode it with a per-row error instead of a crash."""

import hashlib
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import fsspec
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
TAR_SEP = "::"  # "shard.tar::sa_1.jpg" names a member of a tar shard


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    source: str  # a path or URL, or "<tar>::<member>"


def filesystem(path: str, storage_options: Optional[Dict[str, Any]] = None):
    """(fsspec filesystem, path without protocol) for a local path or any fsspec URL."""
    fs, stripped = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs, stripped


def url_for(fs, path: str) -> str:
    """The URL of a path of `fs` (plain path for local files)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def image_id_for(source: str) -> str:
    """A stable id: SA-1B's numeric id for `sa_N` files, else the file stem plus a short path hash."""
    name = posixpath.basename(source.split(TAR_SEP)[-1])
    stem = os.path.splitext(name)[0]
    if stem.startswith("sa_") and stem[3:].isdigit():
        return stem[3:]
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"


def list_images(spec: str, limit: Optional[int] = None,
                storage_options: Optional[Dict[str, Any]] = None) -> List[ImageRef]:
    """Every image named by `spec`, sorted by source so runs are repeatable.

    `spec` is a folder or prefix (local or s3://), a .txt list file (one path or URL a line), or a
    .tar shard / folder of shards holding SA-1B `sa_N.jpg` + `sa_N.json` pairs.
    """
    fs, path = filesystem(spec, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{spec}: no such file, folder or prefix")
    if fs.isdir(path):
        files = sorted(fs.find(path))
        sources = [url_for(fs, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        for shard in (f for f in files if f.lower().endswith(".tar")):
            sources += _tar_members(url_for(fs, shard), storage_options)
    elif path.lower().endswith(".tar"):
        sources = _tar_members(spec, storage_options)
    elif path.lower().endswith((".txt", ".lst")):
        with fs.open(path, "rt") as f:
            sources = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    else:
        sources = [spec]
    sources = sorted(set(sources))
    refs = [ImageRef(image_id_for(s), s) for s in sources]
    return refs[:limit] if limit is not None else refs


def _tar_members(shard: str, storage_options) -> List[str]:
    with fsspec.open(shard, "rb", **(storage_options or {})) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        return [f"{shard}{TAR_SEP}{m.name}" for m in tar if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)]


def read_bytes(source: str, storage_options: Optional[Dict[str, Any]] = None) -> Tuple[bytes, Optional[dict]]:
    """The file's bytes, and for an SA-1B tar member its annotation JSON (None elsewhere)."""
    if TAR_SEP not in source:
        with fsspec.open(source, "rb", **(storage_options or {})) as f:
            return f.read(), None
    shard, member = source.split(TAR_SEP, 1)
    wanted = {member, os.path.splitext(member)[0] + ".json"}
    found: Dict[str, bytes] = {}
    with fsspec.open(shard, "rb", **(storage_options or {})) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.name in wanted:
                found[m.name] = tar.extractfile(m).read()
                if len(found) == len(wanted):
                    break
    if member not in found:
        raise FileNotFoundError(f"{source}: member not in shard")
    ann = found.get(os.path.splitext(member)[0] + ".json")
    return found[member], (json.loads(ann) if ann else None)


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Decode image bytes to an array (any depth; `tinysam.transforms` converts), or raise ValueError."""
    if not data:
        raise ValueError(f"{source}: empty file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "1"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            array = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{source}: not a decodable image ({type(e).__name__}: {e})") from e
    if array.size == 0:
        raise ValueError(f"{source}: image has no pixels")
    return array
