"""jobs/distill.py with one training worker SIGKILLed after a step (run by tests/test_distill.py).

    python -m tests.distill_drill STEP RANK MARKER JOB_ARGS...

The job's own `main`, given a `KillWorkerAt` callback: the fault is injected from the test side,
the job carries no hook for it.
"""

import importlib.util
import sys
from pathlib import Path

import ray.cloudpickle

from tests import helpers

if __name__ == "__main__":
    step, rank, marker, *args = sys.argv[1:]
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers need not import the tests
    spec = importlib.util.spec_from_file_location(
        "distill_job", Path(__file__).resolve().parents[1] / "jobs" / "distill.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    sys.exit(job.main(args, on_step=helpers.KillWorkerAt(int(step), int(rank), marker)))
