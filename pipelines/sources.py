"""Inputs shared by every job: list images and SA-1B tar shards, give each image a stable id,
stream each shard once, and decode with a per-row error instead of a crash.

A Parquet manifest (a `source` column of paths or URLs, an optional `image_id`) is not listed on
the driver at all: Ray Data reads it in parallel (`pipelines/reading.py`), so a corpus of millions
of files costs the driver no list. The driver lists files and shards, never the members inside a
shard: at SA-1B scale (~1,000 shards of ~11,000 images) that would be a pass over every shard
before any work. A shard is one unit of work: one task streams it from its start to its end
(`iter_shard`), from local disk or any fsspec URL, and emits each image with its SA-1B JSON and
its byte range in the shard, so that later readers (distillation, previews) fetch one image with
a ranged read (`read_bytes`).
"""

import hashlib
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import fsspec
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
SHARD_EXTENSIONS = (".tar",)
MANIFEST_EXTENSIONS = (".parquet",)
MANIFEST_COLUMNS = ("source", "image_id")  # source required; image_id optional (default: image_id_for(source))
SIDECAR_EXTENSIONS = (".json", ".txt", ".lst", ".md")  # not images, not reported as unsupported
TAR_SEP = "::"  # "shard.tar::sa_1.jpg" names a member of a tar shard


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    source: str  # a path or URL, or "<tar>::<member>"


@dataclass
class Inputs:
    """What the driver lists: image files, tar shards, and files it cannot read as images."""

    files: List[ImageRef] = field(default_factory=list)
    shards: List[str] = field(default_factory=list)
    unsupported: List[str] = field(default_factory=list)
    manifest: Optional[str] = None  # a Parquet manifest: its rows are read by Ray Data, not listed here
    manifest_rows: int = 0


@dataclass
class Member:
    """One image of a shard, as streamed: bytes, its SA-1B JSON text (not parsed: the reader only
    carries it), byte range in the shard."""

    image_id: str
    source: str
    data: bytes
    annotations: Optional[str]
    offset: int
    length: int
    error: str = ""


def filesystem(path: str, storage_options: Optional[Dict[str, Any]] = None):
    """(fsspec filesystem, path without protocol) for a local path or any fsspec URL.

    `storage_options` are the filesystem's options (e.g. s3fs' key, secret, client_kwargs); a
    ready fsspec filesystem may be passed instead as `storage_options={"filesystem": fs}`."""
    options = dict(storage_options or {})
    fs = options.pop("filesystem", None)
    if fs is not None:
        return fs, fs._strip_protocol(path)
    return fsspec.core.url_to_fs(path, **options)


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


def list_inputs(spec: str, storage_options: Optional[Dict[str, Any]] = None, exclude: Optional[str] = None) -> Inputs:
    """Image files and tar shards named by `spec`, sorted so runs are repeatable.

    `spec` is a folder or prefix (local or s3://), a .txt list file (one path or URL a line), a
    Parquet manifest (not listed: `Inputs.manifest`), a .tar shard, or a folder of shards holding
    SA-1B `sa_N.jpg` + `sa_N.json` pairs. Files under `exclude` (the job's output, when it lies
    inside the input) are left out.
    """
    fs, path = filesystem(spec, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{spec}: no such file, folder or prefix")
    if path.lower().endswith(MANIFEST_EXTENSIONS):
        return Inputs(manifest=spec, manifest_rows=check_manifest(spec, storage_options)[0])
    if fs.isdir(path):
        found = [url_for(fs, f) for f in sorted(fs.find(path))]
    elif path.lower().endswith((".txt", ".lst")):
        with fs.open(path, "rt") as f:
            found = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    else:
        found = [spec]
    if exclude:
        out_fs, out_path = filesystem(exclude, storage_options)
        inside = out_path.rstrip("/") + "/"
        found = [u for u in found if not filesystem(u, storage_options)[1].startswith(inside)]
    inputs = Inputs()
    for url in sorted(set(found)):
        name = url.lower()
        if name.endswith(IMAGE_EXTENSIONS):
            inputs.files.append(ImageRef(image_id_for(url), url))
        elif name.endswith(SHARD_EXTENSIONS):
            inputs.shards.append(url)
        elif not name.endswith(SIDECAR_EXTENSIONS) and not posixpath.basename(name).startswith("."):
            inputs.unsupported.append(url)
    return inputs


def check_manifest(spec: str, storage_options: Optional[Dict[str, Any]] = None) -> Tuple[int, List[str]]:
    """The manifest's row count and which of MANIFEST_COLUMNS it has, from its footer; a clear
    error if it is not a Parquet file with a string `source` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(spec, storage_options)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except Exception as e:
        raise ValueError(f"{spec}: not a readable Parquet manifest ({type(e).__name__}: {e})") from e
    for name in MANIFEST_COLUMNS:
        if name in schema.names and not pa.types.is_string(schema.field(name).type):
            raise ValueError(f"{spec}: manifest column {name!r} must hold strings, not {schema.field(name).type}")
    if "source" not in schema.names:
        raise ValueError(f"{spec}: a manifest needs a 'source' column of paths or URLs (has {schema.names})")
    return meta.num_rows, [c for c in MANIFEST_COLUMNS if c in schema.names]


def manifest_refs(sources: Iterable[str], ids: Optional[Iterable[Optional[str]]] = None) -> List[ImageRef]:
    """A manifest's rows as ImageRefs: its own `image_id` where it gives one, else `image_id_for`."""
    sources = [str(s) for s in sources]
    ids = list(ids) if ids is not None else [None] * len(sources)
    return [ImageRef(str(i) if i else image_id_for(s), s) for s, i in zip(sources, ids)]


def iter_manifest(
    spec: str, storage_options: Optional[Dict[str, Any]] = None, batch_rows: int = 65536
) -> Iterator[List[ImageRef]]:
    """The manifest's rows, `batch_rows` at a time, in file order: memory holds one batch."""
    import pyarrow.parquet as pq

    fs, path = filesystem(spec, storage_options)
    columns = check_manifest(spec, storage_options)[1]
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            table = batch.to_pydict()
            yield manifest_refs(table["source"], table.get("image_id"))


def arrow_filesystem(url: str, storage_options: Optional[Dict[str, Any]] = None):
    """(path, pyarrow filesystem) for Ray Data's readers and Ray Train's storage: the same fsspec
    filesystem as every other read (so s3:// honours the same settings, e.g. AWS_ENDPOINT_URL);
    None for a local path."""
    if "://" not in url:
        return os.path.abspath(url), None
    import pyarrow.fs as pafs

    fs, path = filesystem(url, storage_options)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def list_images(
    spec: str, limit: Optional[int] = None, storage_options: Optional[Dict[str, Any]] = None
) -> List[ImageRef]:
    """The image files named by `spec` (shards are not opened: use `iter_images` for them)."""
    refs = list_inputs(spec, storage_options).files
    return refs[:limit] if limit is not None else refs


def iter_shard(
    shard: str, storage_options: Optional[Dict[str, Any]] = None, skip: Optional[Callable[[str], bool]] = None
) -> Iterator[Member]:
    """Every image of a tar shard in one sequential pass, with its SA-1B JSON when the shard has
    one (`sa_N.json` beside `sa_N.jpg`, before or after it). Images whose id `skip` accepts are
    passed over without being kept. A damaged shard ends with one Member whose `error` says where
    it broke; the images before the damage are still yielded."""
    # SA-1B keeps each image next to its JSON, so at most one image and one JSON wait for their pair:
    # memory stays at one member whatever the shard's size.
    pending: Dict[str, Member] = {}  # an image waiting for its JSON
    notes: Dict[str, str] = {}  # a JSON waiting for its image
    skipped = None  # the stem of the last image passed over: its JSON is not parsed
    fs, path = filesystem(shard, storage_options)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                stem, ext = os.path.splitext(info.name)
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    source = f"{shard}{TAR_SEP}{info.name}"
                    image_id = image_id_for(source)
                    yield from pending.values()  # an older image whose JSON never came
                    pending = {}
                    if skip is not None and skip(image_id):
                        notes, skipped = {}, stem
                        continue
                    member = Member(
                        image_id,
                        source,
                        tar.extractfile(info).read(),
                        notes.pop(stem, None),
                        info.offset_data,
                        info.size,
                    )
                    notes = {}
                    if member.annotations is not None:
                        yield member
                    else:
                        pending = {stem: member}
                elif ext == ".json" and stem != skipped:
                    note = tar.extractfile(info).read().decode("utf-8", errors="replace")
                    if stem in pending:
                        member = pending.pop(stem)
                        member.annotations = note
                        yield member
                    else:
                        notes = {stem: note}
    except (tarfile.TarError, OSError, EOFError) as e:
        yield from pending.values()
        pending = {}
        yield Member(
            f"shard-{hashlib.sha1(shard.encode()).hexdigest()[:10]}",
            shard,
            b"",
            None,
            0,
            0,
            error=f"{shard}: damaged tar shard ({type(e).__name__}: {e}); images before the damage were read",
        )
    yield from pending.values()


def iter_images(
    spec: str, storage_options: Optional[Dict[str, Any]] = None
) -> Iterator[Tuple[ImageRef, bytes, Optional[dict]]]:
    """(ref, bytes, annotations) of every image of `spec`, in process: files in sorted order, then
    each shard in one pass. Unreadable files give empty bytes (the decoder names them)."""
    inputs = list_inputs(spec, storage_options)
    for ref in inputs.files:
        try:
            data, annotations = read_bytes(ref.source, storage_options)
        except OSError:
            data, annotations = b"", None
        yield ref, data, annotations
    for shard in inputs.shards:
        for member in iter_shard(shard, storage_options):
            try:
                annotations = json.loads(member.annotations) if member.annotations else None
            except ValueError:
                annotations = None
            yield ImageRef(member.image_id, member.source), member.data, annotations


def read_bytes(
    source: str,
    storage_options: Optional[Dict[str, Any]] = None,
    offset: Optional[int] = None,
    length: Optional[int] = None,
) -> Tuple[bytes, Optional[dict]]:
    """The bytes of one image (annotations: None). A tar member is read by its byte range in the
    shard (`offset`, `length`, as the jobs store them): one ranged read, never the shard."""
    if TAR_SEP not in source:
        fs, path = filesystem(source, storage_options)
        return fs.cat_file(path), None
    shard, member = source.split(TAR_SEP, 1)
    if offset is None or length is None or offset < 0:
        raise ValueError(f"{source}: a tar member is read by its byte range; none was given")
    fs, path = filesystem(shard, storage_options)
    return fs.cat_file(path, start=int(offset), end=int(offset) + int(length)), None


def decode_image(data: bytes, source: str, max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode image bytes to an array (any depth; `tinysam.transforms` converts), with the EXIF
    orientation applied as viewers (and OpenCV's imread) show it, or raise ValueError. Images
    above `max_pixels` are refused from their header, before their pixels are decoded."""
    if not data:
        raise ValueError(f"{source}: empty file")
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(
                    f"{source}: {im.width}x{im.height} is {im.width * im.height / 1e6:.1f} Mpx, "
                    f"above the limit of {max_pixels / 1e6:.1f} Mpx (--max-megapixels)"
                )
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "1"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            array = np.array(im)
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{source}: not a decodable image ({type(e).__name__}: {e})") from e
    if array.size == 0:
        raise ValueError(f"{source}: image has no pixels")
    return array


class ImageTooLarge(ValueError):
    """An image above the job's pixel limit: reported, never decoded."""
