"""The auto-masking job on the driver: plan, pre-flight, run, summary, exports."""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from tinysam.everything import EverythingConfig
from tinysam.everything.config import GPU_EXECUTION

from ..reading import DEFAULT_MAX_MEGAPIXELS, plan_inputs
from ..results import JobSummary, finish_summary, run_to_output
from ..stages import image_pipeline, model_and_write, preflight
from ..storage.masks import default_rows_per_file
from .exports import write_batch, write_coco_results, write_previews
from .stored import pending_stored, stored_rows


@dataclass
class AutomaskSummary(JobSummary):
    masks: int = 0
    encode_seconds: float = 0.0  # summed over actors
    generate_seconds: float = 0.0

    @property
    def masks_per_image(self) -> float:
        return self.masks / self.written if self.written else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {**super().as_dict(), "masks_per_image": self.masks_per_image}


def automask(
    input: Optional[str],
    output: str,
    model: str = "vit_t",
    checkpoint: Optional[str] = None,
    everything: Optional[EverythingConfig] = None,
    embeddings: Optional[str] = None,
    batch_size: int = 1,
    concurrency: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: int = 1,
    limit: Optional[int] = None,
    max_failures: Optional[int] = None,
    rows_per_file: Optional[int] = None,
    max_megapixels: Optional[float] = DEFAULT_MAX_MEGAPIXELS,
    overwrite: bool = False,
    actor_memory_gb: Optional[float] = None,
    sa1b_json: bool = False,
    coco_json: Optional[str] = None,
    preview: int = 0,
    storage_options: Optional[dict] = None,
    actor_options: Optional[Dict[str, Any]] = None,
) -> AutomaskSummary:
    """Masks for every image of `input` not yet in `output` (or, with `embeddings`, for every image
    of a precompute job's output), with the everything mode `everything` describes (default:
    hierarchical, the official settings). Ray must be initialised by the caller.
    `checkpoint=None` means random weights (tests); the jobs require one."""
    from .worker import AutoMasker  # the driver needs the class; CPU tasks importing this package do not

    if everything is None:  # the defaults, with the GPU execution settings on GPU actors
        everything = EverythingConfig(**(GPU_EXECUTION if num_gpus_per_actor else {}))
    checkpoint_sha = preflight(model, checkpoint, output, storage_options)
    provenance = {
        "model": model,
        "checkpoint_sha256": checkpoint_sha,
        "mode": everything.mode,
        "params": everything.provenance_json(),
    }
    if embeddings:
        if everything.crop_n_layers:
            raise ValueError("crop layers need the images: run without --embeddings")
        plan, files = pending_stored(embeddings, output, provenance, limit, overwrite, storage_options)
    elif input:
        plan = plan_inputs(input, output, provenance, limit, overwrite, storage_options)
    else:
        raise ValueError("give an input (images) or embeddings (a precompute job's output)")
    summary = AutomaskSummary()
    if plan.files or plan.shards:
        actor_kwargs = {
            "model_type": model,
            "checkpoint": checkpoint,
            "everything": everything,
            "memory_gb": actor_memory_gb,
        }
        write_kwargs = {"output": output, "provenance": provenance, "sa1b_json": sa1b_json}
        args = (
            AutoMasker,
            actor_kwargs,
            write_batch,
            write_kwargs,
            batch_size,
            concurrency,
            num_gpus_per_actor,
            num_cpus_per_actor,
            rows_per_file or default_rows_per_file(),
            storage_options,
        )
        if embeddings:
            ds = model_and_write(
                stored_rows(plan, files, batch_size, storage_options), *args, actor_options=actor_options
            )
        else:
            ds = image_pipeline(
                plan,
                *args,
                keep_original=bool(everything.crop_n_layers),
                max_megapixels=max_megapixels,
                output=output,
                actor_options=actor_options,
            )

        def count(result: Dict[str, np.ndarray], i: int) -> None:
            summary.masks += int(result["num_masks"][i])
            summary.encode_seconds += float(result["encode_seconds"][i])
            summary.generate_seconds += float(result["generate_seconds"][i])

        run_to_output(ds, summary, output, max_failures, on_row=count)
    finish_summary(summary, plan, output, storage_options)
    if coco_json:
        write_coco_results(output, coco_json, storage_options)
    if preview:
        write_previews(output, preview, storage_options)
    return summary
