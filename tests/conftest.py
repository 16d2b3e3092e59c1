"""Shared fixtures: the real MobileSAM weights, the official code as oracle, real images."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from tinysam import build_sam
from tinysam.utils.malloc import keep_freed_memory, release_freed_memory
from tinysam.weights import fetch_known
from tinysam_samples import bbbc038, sample_images

from .helpers import free_port, import_official, job_env, wait_for_port


def pytest_configure(config):
    # Under pytest-xdist, split the cores among the workers: two workers with 2 OpenMP threads each
    # on 2 cores spend their time waiting at each op's barrier (measured: a pair of test files
    # 72 s with 2 threads per worker, 42 s with 1).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The order in which pytest-xdist hands test files to its workers (the Makefile's `--dist loadfile
# --no-loadscope-reorder`: a file is one unit of work, on one worker, its module fixtures built
# once): the longest first, so that the last files to finish are short and neither worker idles
# at the end while the other finishes a long one. From the suite's durations on a Zen 4 CI core
# (docs/benchmarks.md, "Test suite time"); files not named follow in their own order.
LONGEST_FIRST = (
    "tests/test_benchmarks.py",
    "tests/test_lost_node.py",
    "tests/test_everything.py",
    "tests/test_quant.py",
    "tests/test_automask.py",
    "tests/test_precompute.py",
    "tests/test_distill.py",
    "tests/test_poison.py",
    "tests/test_onnx.py",
    "tests/test_modeling.py",
    "tests/test_eval.py",
    "tests/test_malloc.py",
    "tests/test_submit.py",
    "tests/test_audit.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        file = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(file) if file in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="module")
def freed_memory_kept():
    """For a module of everything-mode calls: keep freed memory for reuse, as the jobs' actors do,
    instead of faulting every large temporary in afresh (the suite's longest test, the official
    generator at 32x32, among them). Released after the module: kept over the suite's mixed
    work, a worker's heap fragments until Ray's memory monitor kills the jobs beside it
    (docs/benchmarks.md, "Test suite time")."""
    keep_freed_memory()
    yield
    release_freed_memory()


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
    from tinysam_samples import write_sample_photos

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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto) on the loopback interface, for the whole session."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not wait_for_port(port, 30):
        proc.kill()
        pytest.fail("local S3 server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


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
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # Own ports for every agent, so that another Ray on this machine cannot take them first.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if not wait_for_port(dash, 120):
            pytest.fail("the Ray head's dashboard did not start")
        yield f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
