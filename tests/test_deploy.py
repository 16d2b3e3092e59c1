"""The container and the cluster manifests agree with the project: one Ray version everywhere
(the Dockerfile's base image, the manifests' rayVersion, constraints.txt), and every entrypoint is
a real job whose parser accepts its flags (parsed, not run)."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from .helpers import load_job

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
JOBS = {"automask", "precompute_embeddings", "distill"}  # the corpus jobs and training: what runs at scale


def pinned_ray() -> str:
    [version] = re.findall(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    return version


def test_the_image_runs_the_pinned_ray():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    [version] = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert version == pinned_ray()
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in dockerfile
    assert "-c constraints.txt" in dockerfile  # the project with the versions make installs
    launcher = yaml.safe_load((REPO / "deploy" / "aws" / "cluster.yaml").read_text())
    assert launcher["available_node_types"]["head"]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_clusters(path):
    doc = yaml.safe_load(path.read_text())
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned_ray()
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        spec = group["template"]["spec"]
        resources = spec["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    for pod in pods:
        [container] = pod["containers"]
        assert container["image"].split(":")[0].endswith("tinysam-ray")
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # from a secret, never a value
            assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"] == "tinysam-s3"


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.stem.startswith("rayjob-")], ids=lambda p: p.stem)
def test_rayjob_runs_a_real_job_with_flags_it_accepts(path):
    spec = yaml.safe_load(path.read_text())["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0  # resume is the job's own
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    python, script, *argv = shlex.split(spec["entrypoint"])
    assert python == "python" and script.startswith("/home/ray/tinysam-ray/jobs/")
    name = Path(script).stem
    assert (REPO / "jobs" / f"{name}.py").exists() and name in JOBS
    parsed, _ = load_job(name).parse(argv)  # argparse exits on a flag it does not know
    assert parsed is not None
