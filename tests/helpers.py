"""Helpers shared by the tests (fixtures stay in conftest.py): the official code as oracle, seeded
weights, ports, job processes, and fakes shipped to Ray's workers."""

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict

import torch


class CountingFileSystem:
    """An fsspec filesystem that counts what is read through it: wraps another one and appends
    "open <path>" and "read <path> <bytes>" lines to `log` (a local file, so that Ray's worker
    processes can count too). Pass it to the jobs as `storage_options={"filesystem": fs}`; ship
    this module to the workers with `ray.cloudpickle.register_pickle_by_value`."""

    def __init__(self, inner, log: str) -> None:
        self.inner, self.log = inner, log

    def __getattr__(self, name):
        if name in ("inner", "log") or name.startswith("__"):  # unpickling: not set yet
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _note(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def open(self, path, mode="rb", **kwargs):
        f = self.inner.open(path, mode, **kwargs)
        if "r" not in mode:
            return f
        self._note(f"open {path}")
        return _CountingFile(f, lambda n: self._note(f"read {path} {n}"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = self.inner.cat_file(path, start=start, end=end, **kwargs)
        self._note(f"open {path}")
        self._note(f"read {path} {len(data)}")
        return data


class _CountingFile:
    def __init__(self, f, report) -> None:
        self.f, self.report, self.count = f, report, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.count += len(data)
        return data

    def close(self):
        self.report(self.count)
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        if name == "f" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.f, name)


def read_counts(log: str, suffix: str) -> Dict[str, int]:
    """{"opens": n, "bytes": n} of the paths ending in `suffix`, from a CountingFileSystem log."""
    counts = {"opens": 0, "bytes": 0}
    if not os.path.exists(log):
        return counts
    with open(log) as f:
        for line in f:
            kind, path, *rest = line.split()
            if path.endswith(suffix):
                counts["opens" if kind == "open" else "bytes"] += 1 if kind == "open" else int(rest[0])
    return counts


class DyingEncoder:
    """A stand-in for the model actor that dies (os._exit, as the OOM killer would end it) on any
    batch holding an image named "poison", and gives zero embeddings otherwise. It dies a moment
    after the batch arrives, as a model would, so that any batch Ray queues behind it on the same
    actor is there to die with it."""

    def __init__(self, cpu_threads=None, **_) -> None:
        pass

    def __call__(self, batch):
        import numpy as np

        if any("poison" in str(s) for s in batch["source"]):
            time.sleep(1)
            os._exit(1)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = np.zeros((len(batch["image_id"]), 256, 64, 64), np.float16)
        return out


def import_official(package: str):
    """Import an oracle package, silencing the deprecation noise of its timm imports."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return __import__(package)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and buffer with seeded noise (zero-initialised ones too), real shapes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * 0.02
            if name.endswith("running_var") or ("norm" in name and name.endswith("weight")):
                t.copy_(1.0 + noise)
            else:
                t.copy_(noise)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> bool:
    """Whether something listens on 127.0.0.1:port within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def s3_env(endpoint: str) -> dict:
    """Environment that points boto/s3fs at a local S3 server with dummy credentials."""
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }


def job_env() -> dict:
    """Environment for job subprocesses: this venv's python first, no token auth, quiet Ray."""
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def load_job(name: str):
    """The job `jobs/<name>.py` as a module, to call its `main(argv)` in this process: its refusals
    and reruns are tested without the seconds of a second Python start."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """`benchmarks/<name>.py` as a module (its folder on sys.path, as when it runs), to test the
    pieces a benchmark puts together in this process."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def submit_job(address: str, entrypoint: list, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit` of this repository as working dir; retried while the head's job agent starts."""
    repo = Path(__file__).resolve().parents[1]
    submit = [
        "ray",
        "job",
        "submit",
        f"--address={address}",
        "--working-dir",
        str(repo),
        "--runtime-env-json",
        '{"excludes": [".venv", ".cache", ".git", "demo_output"]}',
        "--",
        *entrypoint,
    ]
    for _ in range(60):  # the head's job agent comes up a little after its dashboard
        done = subprocess.run(submit, env=job_env(), capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stderr + done.stdout:
            return done
        time.sleep(2)
    return done


def kill_midway_and_rerun(cmd: list, out: Path, total: int) -> int:
    """Start a job, SIGKILL it (driver and the local Ray it started) once its first output file
    appears, assert the kill landed mid-run, rerun it to the end; returns the files written before
    the kill (the rerun must report them as already present)."""
    proc = subprocess.Popen(
        cmd, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 480  # a loaded 2-core machine can take minutes to start Ray and the model
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written_before = len(list(out.glob("part-*.parquet")))
    assert 1 <= written_before < total, f"the kill should land mid-run: {written_before} of {total} files written"
    rerun = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"already present {written_before}" in rerun.stdout
    return written_before


def flags(**values) -> list:
    """A job's command-line flags from keyword arguments: flags(num_cpus=2) -> ["--num-cpus", "2"]."""
    out = []
    for name, value in values.items():
        out += ["--" + name.replace("_", "-"), str(value)]
    return out


def distill_args(embeddings, teacher_checkpoint, **more) -> list:
    """The distillation job's arguments in the tests: a vit_t_mini student from scratch, a
    checkpoint every 2 steps, 4 prompts and 2 hard-sampling iterations per image (each of these
    overridden by `more`)."""
    defaults = dict(student="vit_t_mini", checkpoint_every=2, prompts_per_image=4, max_iterations=2, warmup_steps=2)
    return flags(embeddings=embeddings, teacher_checkpoint=teacher_checkpoint, **{**defaults, **more})
