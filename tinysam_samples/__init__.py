"""Real sample data for the demos, the tests and the benchmarks, kept out of the `tinysam` library:
photos from scikit-image, the BBBC038 nuclei with their ground truth, SA-1B-style shards made from
them (`data.py`), and the predictor demo (`predictor_demo.py`). Installed with the project so that
a benchmark or the demo runs from any folder."""

from .data import (
    ALL_PHOTOS,
    SAMPLE_PHOTOS,
    bbbc038,
    bbbc038_coco,
    instance_masks,
    sample_images,
    write_pseudo_labelled_shard,
    write_sample_corpus,
    write_sample_photos,
    write_synthetic_sa1b_shard,
)

__all__ = [
    "ALL_PHOTOS",
    "SAMPLE_PHOTOS",
    "bbbc038",
    "bbbc038_coco",
    "instance_masks",
    "sample_images",
    "write_pseudo_labelled_shard",
    "write_sample_corpus",
    "write_sample_photos",
    "write_synthetic_sa1b_shard",
]
