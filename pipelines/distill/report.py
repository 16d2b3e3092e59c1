"""The distillation run's summary and its Markdown table, from the history the workers checkpoint."""

import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from ..storage.files import write_bytes_atomic


@dataclass
class DistillSummary:
    steps: int
    images_seen: int
    restarts: List[int]  # steps the run resumed from after a failure or --resume
    checkpoint: str
    export: Optional[str]
    miou_start: float
    miou_end: float
    loss_start: float
    loss_end: float
    images_per_second: float
    step_seconds: float  # median compute time of a step (data wait and reports excluded)
    data_wait_fraction: float
    table: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def summarize(history: List[Dict[str, Any]], checkpoint: str, exported: Optional[str]) -> DistillSummary:
    """The run's summary and a Markdown table of its evaluations (one row per checkpoint)."""
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "miou_vs_teacher" in h]
    restarts = [h["step"] for h in history if h.get("event") == "resumed"]
    waits = sum(h["data_wait_seconds"] for h in steps)
    busy = sum(h["step_seconds"] for h in steps)
    rows = [
        "| step | loss | embedding | token | output | focal | dice | iou | mIoU(student, teacher) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in evals:
        terms = [
            f"{h[k]:.4f}" if k in h else "-" for k in ("loss", "embedding", "token", "output", "focal", "dice", "iou")
        ]
        rows.append(f"| {h['step']} | " + " | ".join(terms) + f" | {h['miou_vs_teacher']:.4f} |")
    window = max(1, len(steps) // 4)
    return DistillSummary(
        steps=steps[-1]["step"] if steps else 0,
        images_seen=int(sum(h["images"] for h in steps)),
        restarts=restarts,
        checkpoint=str(checkpoint),
        export=exported,
        miou_start=evals[0]["miou_vs_teacher"] if evals else float("nan"),
        miou_end=evals[-1]["miou_vs_teacher"] if evals else float("nan"),
        loss_start=float(np.mean([h["loss"] for h in steps[:window]])) if steps else float("nan"),
        loss_end=float(np.mean([h["loss"] for h in steps[-window:]])) if steps else float("nan"),
        images_per_second=float(np.median([h["images_per_second"] for h in steps])) if steps else 0.0,
        step_seconds=float(np.median([h["step_seconds"] for h in steps])) if steps else 0.0,
        data_wait_fraction=waits / (waits + busy) if steps else 0.0,
        table="\n".join(rows) + "\n",
    )


def write_text(path: str, text: str, storage_options: Optional[dict]) -> None:
    folder, name = posixpath.split(path)
    write_bytes_atomic(text.encode(), folder, name, storage_options)
