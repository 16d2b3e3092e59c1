"""Starting or joining Ray the same way in every job."""

import os
from typing import Dict, Optional


def init_ray(num_cpus: Optional[int] = None, dashboard: bool = False) -> None:
    """Join the cluster when there is one (inside `ray job submit`, or RAY_ADDRESS set), else start
    a local Ray in this process. `num_cpus` and `dashboard` apply to a local Ray only (Ray Train
    needs the dashboard's state API: without it its placement-group cleaner warns every second)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard)


# PyTorch's transparent huge pages for large CPU buffers: a CPU training step frees and refaults
# its large activations page by page without them (docs/design.md, "Huge pages for training").
# Inference gained nothing from it, so only the training workers get it.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def training_worker_env() -> Dict[str, str]:
    """Environment of the training workers: huge pages on unless the caller's environment sets the variable."""
    return {HUGE_PAGES_ENV: os.environ.get(HUGE_PAGES_ENV, "1")}


def model_actor_env() -> Dict[str, str]:
    """Environment of the model actors' processes (set before Python starts, where glibc reads it).

    Ray Data runs a callable class's batches on a thread of a pool, not the process's main thread,
    and glibc gives such threads arenas of their own whose heaps hold at most 64 MiB: every larger
    temporary is then mapped and faulted in afresh, whatever `keep_freed_memory` sets (everything
    mode at 16 prompts per decoder call: 6.9 M page faults a photo, 1.5x slower than in the main
    thread). One arena is the main heap, where those settings hold. A value in the caller's
    environment wins."""
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}


def on_one_thread(actor_cls: type) -> type:
    """`actor_cls` with its constructor and every call run on one thread of its own.

    Ray Data builds a callable class on the actor's main thread but calls it on a pool thread.
    GNU OpenMP keeps a team of worker threads for each thread that starts parallel work, so a
    model built on one thread and run on another leaves the process with two teams: more OpenMP
    threads than cores. libgomp then makes its idle workers sleep at once instead of spinning, and
    every parallel op pays to wake them (a 16x256 matmul on 2 threads: 5-7x slower; everything
    mode on a photo: 1.1-1.4x slower, docs/design.md "One thread per model actor"). On one thread
    there is one team, as in a plain script."""

    class OnOneThread(actor_cls):
        def __init__(self, *args, **kwargs) -> None:
            from concurrent.futures import ThreadPoolExecutor

            self._compute_thread = ThreadPoolExecutor(1, thread_name_prefix=actor_cls.__name__)
            self._compute_thread.submit(super().__init__, *args, **kwargs).result()

        def __call__(self, *args, **kwargs):
            return self._compute_thread.submit(super().__call__, *args, **kwargs).result()

    OnOneThread.__name__ = OnOneThread.__qualname__ = actor_cls.__name__  # Ray names the stage after it
    OnOneThread.__doc__ = actor_cls.__doc__
    return OnOneThread
