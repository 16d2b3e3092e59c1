"""A job on a two-node Ray cluster whose second node dies mid-run (run by tests/test_lost_node.py).

    python -m tests.lost_node precompute INPUT OUTPUT CHECKPOINT
    python -m tests.lost_node distill ARGS_JSON

A head and a second node, each with its own raylet (ray.cluster_utils.Cluster). The model actors
(precompute) or one training worker (distill) run on the second node; once the job has made
progress (a first output file, or a first checkpoint), the node is removed without grace: its
raylet and workers are SIGKILLed. Prints one line "RESULT {json}": whether the job finished, and
what was there when the node died.
"""

import json
import sys
import threading
import time
from pathlib import Path

FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def start_cluster(head_cpus: int, node_cpus: int, node_resources: dict = None, system_config: dict = None):
    import socket

    import ray
    from ray.cluster_utils import Cluster

    # the dashboard serves the state API: which node each actor is on when the node dies. On a
    # free port: a job in another test process may hold Ray's default 8265, and unlike ray.init
    # the cluster utility does not move on to the next port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "include_dashboard": True,
            "dashboard_port": port,
            # the lost node is noticed in ~3 s, not Ray's default 5 missed checks 3 s apart: the
            # test waits out the detection, the property under test is the recovery after it
            "_system_config": {**FAST_NODE_DEATH, **(system_config or {})},
        },
    )
    node = cluster.add_node(num_cpus=node_cpus, resources=node_resources or {})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, node


def actors_on(node_id: str) -> list:
    """Class names of the live actors on a node."""
    from ray.util.state import list_actors

    try:
        return sorted(a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.node_id == node_id)
    except Exception as e:  # the state API is a check of the test, not of the job
        return [f"unknown ({type(e).__name__})"]


def kill_when(cluster, node, ready, state: dict) -> threading.Thread:
    """Remove `node` without grace (SIGKILL) once `ready()` is true."""

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not ready():
            time.sleep(0.1)
        state["progress_at_kill"] = ready()
        state["actors_on_node"] = actors_on(node.node_id)
        cluster.remove_node(node, allow_graceful=False)
        state["killed"] = True

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


class StubEncoder:
    """The precompute job's model actor without a model: zero embeddings, a fraction of a second
    per image (the property under test is Ray's: the actor's node dies mid-run). Defined in the
    scenario's __main__, so Ray ships it by value."""

    def __init__(self, cpu_threads=None, **_) -> None:
        pass

    def __call__(self, batch):
        import numpy as np

        time.sleep(0.3)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = np.zeros((len(batch["image_id"]), 256, 64, 64), np.float16)
        return out


def precompute(input: str, output: str, checkpoint: str) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import pipelines.precompute
    import pipelines.stages
    from pipelines.options import CorpusOptions
    from pipelines.precompute import PrecomputeOptions, precompute_embeddings

    cluster, node = start_cluster(head_cpus=3, node_cpus=2)
    state = {"killed": False}
    files = lambda: sorted(Path(output).glob("part-*.parquet"))  # noqa: E731
    kill_when(cluster, node, lambda: len(files()) >= 1, state)
    # soft: the actor starts on the second node, and may be restarted elsewhere once it is gone
    on_node = NodeAffinitySchedulingStrategy(node.node_id, soft=True)
    actor_stage = pipelines.stages.model_actor_stage

    def on_the_second_node(*args):
        *head, remote_args = args
        return actor_stage(*head, {**(remote_args or {}), "scheduling_strategy": on_node})

    pipelines.stages.model_actor_stage = on_the_second_node
    pipelines.precompute.TeacherEncoder = StubEncoder
    try:
        summary = precompute_embeddings(
            PrecomputeOptions(
                CorpusOptions(input=input, output=output, batch_size=1, rows_per_file=1),
                teacher="vit_t",
                checkpoint=checkpoint,
            )
        )
        state.update(outcome="finished", written=summary.written, failed=summary.failed)
    except Exception as e:  # reported: the test fails with it
        state.update(outcome="failed", failed=None, error=f"{type(e).__name__}: {e}"[:2000])
    state["files_at_end"] = len(files())
    return state


def registered_checkpoints(storage: str) -> int:
    """Checkpoints Ray Train has registered in the run folder `storage` (a path or an S3 URL; a
    checkpoint folder appears before it is registered, and a run that dies in between rightly
    starts again from zero)."""
    import fsspec

    try:
        with fsspec.open(f"{storage}/checkpoint_manager_snapshot.json", "rb") as f:
            return len(json.load(f)["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def distill(args: list) -> dict:
    """jobs/distill.py's main on the cluster: the head fits one training worker at most, so at least
    one runs on the second node; once Ray Train has registered the first checkpoint the second node
    dies, and a third node (what an autoscaler would add) takes its place."""
    import importlib.util

    # No lineage to rebuild a lost block from: the run must not depend on the driver rebuilding
    # one before the restarted workers ask for it. With lineage, that race is lost now and then
    # (seen in CI); without it, a borrowed block of the lost node fails every restart.
    cluster, node = start_cluster(head_cpus=1, node_cpus=2, system_config={"max_lineage_bytes": 0})
    storage = f"{args[args.index('--storage-path') + 1]}/{args[args.index('--name') + 1]}"
    path = Path(__file__).resolve().parents[1] / "jobs" / "distill.py"
    spec = importlib.util.spec_from_file_location("distill_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    state = {"killed": False}

    def run() -> None:
        try:
            state["exit"] = job.main(args)
            state["outcome"] = "finished" if state["exit"] == 0 else "failed"
        except Exception as e:
            state.update(outcome="failed", error=f"{type(e).__name__}: {e}"[:2000])

    # The job in a thread: starting a node sets a signal handler, which only the main thread may.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and not registered_checkpoints(storage):
        time.sleep(0.2)
    state["progress_at_kill"] = registered_checkpoints(storage)
    state["actors_on_node"] = actors_on(node.node_id)
    cluster.remove_node(node, allow_graceful=False)
    state["killed"] = True
    cluster.add_node(num_cpus=2)
    thread.join(timeout=400)
    return state


if __name__ == "__main__":
    from ray._common.utils import reset_ray_address

    kind, rest = sys.argv[1], sys.argv[2:]
    try:
        result = precompute(*rest) if kind == "precompute" else distill(json.loads(rest[0]))
    finally:
        # the cluster utility names its head in /tmp/ray/ray_current_cluster for `ray.init()` to
        # find; left there, a later local Ray Train run on this machine asks that dead head for its
        # actors' state (Ray Train's placement-group cleaner) and waits out a timeout at its end
        reset_ray_address()
    print("RESULT " + json.dumps(result), flush=True)
