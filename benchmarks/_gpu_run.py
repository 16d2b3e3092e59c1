"""The state of one `gpu_check.py` run, which its main sets: the device, smoke mode, where and by
when to report, and the results so far. The section modules read it at call time."""

from typing import Any, Dict

RESULTS: Dict[str, Any] = {}
DEVICE = "cuda"
SMOKE = False  # --smoke-cpu: toy sizes on the CPU
OUT_DIR: Any = None
DEADLINE = float("inf")
