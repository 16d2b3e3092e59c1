"""Every benchmark still runs: each in its smoke mode (toy sizes, seconds), as a user would start it.
Benchmarks rot when nothing runs them (a storage change once broke `benchmarks/distill.py --curve`
unnoticed). Their figures are not checked here: they are ratios measured side by side, which
belong in docs/benchmarks.md, not in timed tests."""

import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import job_env

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
# Run by hand, not here: its smoke chains the teacher's labelling, the precompute job and a Ray
# Train job (~5 min on an AVX2 CI core, a sixth of the suite's budget); each of those is tested in
# test_precompute.py and test_distill.py, and `--train-only` in test_distill.py.
# distill_ablation.py: the same set-up and four Ray Train jobs (~2 min as a smoke here).
NOT_IN_THE_SUITE = {"distill_recovery", "distill_ablation"}
# huge_pages.py runs in distill.py's test, on the photos and embeddings distill.py prepared
# (`--data`): labelling them and the precompute job are most of either smoke run.
AFTER_DISTILL = "huge_pages"


def test_every_benchmark_is_listed():
    assert {"distill", "everything", "gpu_check", "quantize"} <= set(BENCHMARKS)
    assert NOT_IN_THE_SUITE | {AFTER_DISTILL} <= set(BENCHMARKS)  # a benchmark named here still exists


# gpu_check's rehearsal on a CPU takes minutes even at toy sizes (SAM-H's sections, its job
# sections at the GPU's settings): the suite rehearses its everything-mode section, the rest is
# run by hand before a lease (`--smoke-cpu`); the jobs' own code paths are tested elsewhere
GPU_CHECK_SECTIONS = "everything"


def run_smoke(name: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *flags],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert done.stdout.strip(), out[-4000:]  # it reported something
    return out


@pytest.mark.parametrize("name", sorted(set(BENCHMARKS) - NOT_IN_THE_SUITE - {AFTER_DISTILL}))
def test_benchmark_runs_in_its_smoke_mode(name, tmp_path):
    flags = ["--smoke"]
    if name == "gpu_check":
        flags = ["--smoke-cpu", "--out", str(tmp_path), "--sections", GPU_CHECK_SECTIONS]
    if name == "distill":
        flags += ["--data", str(tmp_path / "data")]
    run_smoke(name, *flags)
    if name == "distill":
        data = tmp_path / "data"
        prepared = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
        assert (data / "prepared.json") in prepared and any(p.suffix == ".parquet" for p in prepared)
        run_smoke(AFTER_DISTILL, "--smoke", "--data", str(data))
        assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == prepared  # reused, not made again
    if name == "gpu_check":  # each section reports its own failure and the run goes on: read them
        import json

        results = json.loads((tmp_path / "gpu_check.json").read_text())
        failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
        assert not failed, failed
