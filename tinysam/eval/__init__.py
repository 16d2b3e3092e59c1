"""The paper's zero-shot evaluation protocols (pure PyTorch + pycocotools, no Ray).

- `box_prompt`: one mask per box (detections or ground-truth boxes), COCO AP with pycocotools.
- `point_prompt`: SAM's interactive point protocol, mIoU after 1, 2, 3, 5, 9 points.
- `everything`: everything-mode mIoU against ground truth and seconds per image, for dense and
  hierarchical modes and any grid of (round-1 density, round-2 density, tau).
- `evaluate`: per-image evaluation of all three and their aggregation (shared by the loop and
  the Ray job); `report`: Markdown and JSON tables.
"""

from .box_prompt import box_prompt_image, box_prompt_miou, coco_segm_stats
from .dataset import CocoImages
from .evaluate import EvalConfig, aggregate, evaluate_dataset, evaluate_image
from .everything import EverythingConfig, everything_image
from .point_prompt import first_point, next_point, point_prompt_image
from .report import markdown_table, report_markdown

__all__ = [
    "CocoImages",
    "EvalConfig",
    "EverythingConfig",
    "aggregate",
    "evaluate_dataset",
    "box_prompt_image",
    "box_prompt_miou",
    "coco_segm_stats",
    "evaluate_image",
    "everything_image",
    "first_point",
    "markdown_table",
    "next_point",
    "report_markdown",
    "point_prompt_image",
]
