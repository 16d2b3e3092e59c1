"""Shared fixtures: the real MobileSAM weights, the official code as oracle, real images."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tinysam import build_sam
from tinysam.sample_data import bbbc038, sample_images
from tinysam.weights import fetch_known


def pytest_configure(config):
    # Under pytest-xdist, split the cores among the workers: two workers with 2 OpenMP threads each
    # on 2 cores spend their time waiting at each op's barrier (measured: a pair of test files
    # 72 s with 2 threads per worker, 42 s with 1).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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


@pytest.fixture(scope="session")
def mobile_sam_path():
    return fetch_known("mobile_sam")


@pytest.fixture(scope="session")
def vit_t(mobile_sam_path):
    return build_sam("vit_t", str(mobile_sam_path))


@pytest.fixture(scope="session")
def official_vit_t(mobile_sam_path):
    mobile_sam = import_official("mobile_sam")
    model = mobile_sam.sam_model_registry["vit_t"]()
    model.load_state_dict(torch.load(mobile_sam_path, weights_only=True), strict=True)
    return model.eval()  # eval() after loading refreshes TinyViT's cached attention biases


@pytest.fixture(scope="session")
def photos():
    return dict(sample_images())


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory):
    """A folder of three real photos as JPEG files: a tiny corpus for the jobs."""
    from tinysam.sample_data import write_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder, ("astronaut", "coffee", "chelsea"))
    return folder


@pytest.fixture(scope="session")
def astronaut(photos):
    return photos["astronaut"]


@pytest.fixture(scope="session")
def nuclei():
    image, labels = bbbc038()
    return image, labels


@pytest.fixture
def rng():
    return np.random.default_rng(0)


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
    return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto) on the loopback interface, for the whole session."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_for_port(port, 30):
        proc.kill()
        pytest.fail("local S3 server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def job_env() -> dict:
    """Environment for job subprocesses: this venv's python first, no token auth, quiet Ray."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray in this process, shared by the tests of a test process (a start costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """A Ray head with a job server, started by the tests (own ports, own temp dir) and killed by its
    process group at the end, never by a bare `ray stop`. Yields the dashboard address."""
    env = job_env()
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats",
         # Own ports for every agent, so that another Ray on this machine cannot take them first.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if not wait_for_port(dash, 120):
            pytest.fail("the Ray head's dashboard did not start")
        yield f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def load_job(name: str):
    """The job `jobs/<name>.py` as a module, to call its `main(argv)` in this process: its refusals
    and reruns are tested without the seconds of a second Python start."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def submit_job(address: str, entrypoint: list, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit` of this repository as working dir; retried while the head's job agent starts."""
    repo = Path(__file__).resolve().parents[1]
    submit = ["ray", "job", "submit", f"--address={address}", "--working-dir", str(repo),
              "--runtime-env-json", '{"excludes": [".venv", ".cache", ".git", "demo_output"]}', "--", *entrypoint]
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
    proc = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written_before = len(list(out.glob("part-*.parquet")))
    assert 1 <= written_before < total, "the kill should land mid-run"
    rerun = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"already present {written_before}" in rerun.stdout
    return written_before
