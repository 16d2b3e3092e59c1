"""What every corpus job shares: where it reads and writes, how its model actors run, its limits.

A job's parser builds one frozen options object (`CorpusOptions` inside the job's own, e.g.
`AutomaskOptions`) and hands it whole to the pipeline, as Ray Train takes a `ScalingConfig`: adding
an option is one field here and one flag in `pipelines/cli.py`, not five signatures.
"""

from dataclasses import dataclass
from typing import Optional

from .reading import DEFAULT_MAX_MEGAPIXELS


@dataclass(frozen=True)
class CorpusOptions:
    """The corpus, the output and the model actors of a batch job."""

    output: str  # folder or s3:// prefix of the Parquet files
    input: Optional[str] = None  # see pipelines/cli.py INPUT_HELP
    batch_size: int = 1  # images per actor call
    concurrency: int = 1  # model actors
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: int = 1  # CPUs (and torch threads on a CPU) per actor
    limit: Optional[int] = None  # only N images: files in sorted order, then shard members
    max_failures: Optional[int] = None  # stop once more than N images failed
    rows_per_file: Optional[int] = None  # default: files of ~128 MiB
    max_megapixels: Optional[float] = DEFAULT_MAX_MEGAPIXELS  # larger images are reported, not decoded
    overwrite: bool = False  # redo the rows of an output made with another model or settings
    actor_memory_gb: Optional[float] = None  # an image that needs more is reported alone
    storage_options: Optional[dict] = None  # fsspec options of s3:// inputs and outputs

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "num_cpus_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_gpus_per_actor < 0:
            raise ValueError(f"num_gpus_per_actor must be >= 0, got {self.num_gpus_per_actor}")
