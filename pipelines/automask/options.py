"""The auto-masking job's options: what a run masks, with which model, and its teacher audit.

Their own module so that the actors (worker.py) and the driver (job.py) both import them without
importing each other."""

from dataclasses import dataclass
from typing import Optional

from tinysam.everything import EverythingConfig
from tinysam.everything.config import GPU_EXECUTION
from tinysam.utils.polygons import PolygonRules

from ..options import CorpusOptions


@dataclass(frozen=True)
class AuditOptions:
    """A teacher audit: `fraction` of the images (a deterministic sample by id) masked again by
    the teacher in the same everything mode, each one's agreement stored in `<output>/_audit`."""

    fraction: float
    checkpoint: str
    model: str = "vit_h"
    worst: int = 5  # images listed in the summary

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--audit-fraction must be in (0, 1], got {self.fraction}")


@dataclass(frozen=True)
class AutomaskOptions:
    """An auto-masking run: the corpus and actors, the model, the everything mode, the exports."""

    corpus: CorpusOptions
    model: str = "vit_t"
    checkpoint: Optional[str] = None  # None: random weights (tests); the job requires one
    everything: Optional[EverythingConfig] = None  # None: the defaults (GPU execution settings on GPU actors)
    embeddings: Optional[str] = None  # a precompute job's output: its embeddings instead of the encoder
    sa1b_json: bool = False  # also <output>/sa1b/<id>.json per image
    coco_json: Optional[str] = None  # also one COCO results file (and <name>_images.json) here
    preview: int = 0  # overlay PNGs of the first N images
    audit: Optional[AuditOptions] = None  # a teacher audit of a sample of the images
    polygons: Optional[PolygonRules] = None  # also COCO polygons of each mask, by these rules

    def __post_init__(self) -> None:
        if not self.corpus.input and not self.embeddings:
            raise ValueError("give an input (images) or embeddings (a precompute job's output)")
        if self.embeddings and self.audit is not None:
            raise ValueError("the audit's teacher needs the images: run without --embeddings")
        if self.embeddings and self.everything is not None and self.everything.crop_n_layers:
            raise ValueError("crop layers need the images: run without --embeddings")

    def everything_config(self) -> EverythingConfig:
        if self.everything is not None:
            return self.everything
        return EverythingConfig(**(GPU_EXECUTION if self.corpus.num_gpus_per_actor else {}))
