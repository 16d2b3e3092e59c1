"""Starting or joining Ray the same way in every job."""

import os
from typing import Optional


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
