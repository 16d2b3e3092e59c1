"""jobs/distill.py with one training worker SIGKILLed after a step (run by tests/test_distill.py).

    python -m tests.distill_drill STEP RANK MARKER JOB_ARGS...

The job's own `main`, its training loop wrapped from the test side: in each worker, `ray.train.report`
is wrapped so that the worker of RANK SIGKILLs itself right after reporting STEP, once (the marker
file keeps the restarted worker alive). The job carries no hook for it.
"""

import importlib.util
import sys
from pathlib import Path

import pipelines.distill.worker


def killing_at(step: int, rank: int, marker: str):
    """The job's training loop, with the kill after the report of `step` on worker `rank`. Defined
    in this __main__ module, so Ray ships it to the workers by value."""
    loop = pipelines.distill.worker.train_loop_per_worker

    def train_loop_per_worker(config):
        import os
        import signal

        import ray.train

        report = ray.train.report

        def report_then_die(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            here = ray.train.get_context().get_world_rank()
            if metrics.get("step") == step and here == rank and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

        ray.train.report = report_then_die
        try:
            loop(config)
        finally:
            ray.train.report = report

    return train_loop_per_worker


if __name__ == "__main__":
    step, rank, marker, *args = sys.argv[1:]
    pipelines.distill.worker.train_loop_per_worker = killing_at(int(step), int(rank), marker)
    spec = importlib.util.spec_from_file_location(
        "distill_job", Path(__file__).resolve().parents[1] / "jobs" / "distill.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    sys.exit(job.main(args))
