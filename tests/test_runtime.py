"""How the model actors' processes run: one OpenMP team, on one thread."""

import os

import pytest


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a team of OpenMP threads needs two cores")
def test_a_model_actor_runs_parallel_ops_without_waking_sleeping_threads(ray_local):
    """Ray Data builds a callable class on the actor's main thread and calls it on a pool thread:
    two OpenMP teams, more threads than cores, so libgomp puts its idle workers to sleep after
    every parallel op and wakes them for the next (~4 voluntary context switches an op, 1.1-1.4x
    slower everything mode). Model actors run on one thread of their own (`on_one_thread`): the
    workers spin between ops as in a plain script."""
    import ray

    from pipelines.options import CorpusOptions
    from pipelines.stages import ModelStage, model_and_write

    class Probe:
        def __init__(self, cpu_threads=None):
            import threading

            import torch

            torch.set_num_threads(2)
            self.weight = torch.randn(256, 256)
            self.tokens = torch.randn(16, 256)
            self.tokens @ self.weight  # the constructor's thread starts a team, as building a model does
            self.init_thread = threading.get_ident()

        def __call__(self, batch):
            import resource
            import threading
            import time

            def switches() -> int:
                return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw

            before, t0 = switches(), time.perf_counter()
            for _ in range(2000):
                self.tokens @ self.weight
            during, seconds = switches(), time.perf_counter() - t0
            # the process's other threads (Ray's) switch too, more the busier the machine: their
            # count over as long again without ops is taken off
            time.sleep(seconds)
            idle = switches() - during
            batch["switches"] = [during - before - idle] * len(batch["id"])
            batch["same_thread"] = [threading.get_ident() == self.init_thread] * len(batch["id"])
            return batch

    def write(batch, storage_options=None):
        return batch

    corpus = CorpusOptions(output="", num_cpus_per_actor=2)
    [row] = model_and_write(ray.data.range(1), ModelStage(Probe, {}, write, {}), corpus).take_all()
    assert row["switches"] < 2000, row  # two teams: 2-4 an op, 4000-8000
    assert row["same_thread"]
