"""Results tables: one row per model, as Markdown (for humans and the README) and JSON."""

from typing import Any, Dict, List, Sequence


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(summaries: Dict[str, Dict[str, Any]]) -> str:
    """All protocols' tables for {model label: aggregate summary}."""
    parts: List[str] = []
    first = next(iter(summaries.values()))
    if "box" in first:
        keys = list(first["box"])
        parts.append(
            "### Box prompts (COCO segm AP; mIoU with ground-truth boxes)\n\n"
            + markdown_table(
                ["model", *keys], [[m, *[s["box"].get(k, "") for k in keys]] for m, s in summaries.items()]
            )
        )
    if "point" in first:
        ks = list(first["point"])
        parts.append(
            "### Point prompts (mIoU after k points)\n\n"
            + markdown_table(
                ["model", *[f"{k} pt" for k in ks]], [[m, *[s["point"][k] for k in ks]] for m, s in summaries.items()]
            )
        )
    if "everything" in first:
        rows = [
            [m, name, v["mIoU"], v["seconds_per_image"], v["masks_per_image"]]
            for m, s in summaries.items()
            for name, v in s["everything"].items()
        ]
        parts.append(
            "### Everything mode (best IoU per ground-truth mask, averaged)\n\n"
            + markdown_table(["model", "mode", "mIoU", "s/image", "masks/image"], rows)
        )
    return "\n\n".join(parts) + "\n"
