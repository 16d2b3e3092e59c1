"""The auto-masking job on the driver: plan, pre-flight, run, summary, exports."""

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..reading import plan_inputs
from ..results import JobSummary, finish_summary, run_to_output
from ..stages import ModelStage, image_pipeline, model_and_write, preflight
from ..storage.audit import delete_other_audits, read_audit
from ..storage.masks import default_rows_per_file
from .exports import write_batch, write_coco_results, write_previews
from .options import AutomaskOptions
from .stored import pending_stored, stored_embedding_rows


@dataclass
class AutomaskSummary(JobSummary):
    masks: int = 0
    encode_seconds: float = 0.0  # summed over actors
    generate_seconds: float = 0.0
    audited: int = 0  # images in the audit table (this run's and earlier runs' of the same settings)
    audit_agreement: Optional[float] = None  # their mean agreement with the teacher
    audit_worst: List[Dict[str, Any]] = field(default_factory=list)  # the least agreeing images

    @property
    def masks_per_image(self) -> float:
        return self.masks / self.written if self.written else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {**super().as_dict(), "masks_per_image": self.masks_per_image}


def automask(options: AutomaskOptions) -> AutomaskSummary:
    """Masks for every image of the corpus's input not yet in its output (or, with `embeddings`,
    for every image of a precompute job's output), in the everything mode the options describe.
    Ray must be initialised by the caller."""
    from .worker import AutoMasker  # the driver needs the class; CPU tasks importing this package do not

    corpus, everything = options.corpus, options.everything_config()
    output, storage_options = corpus.output, corpus.storage_options
    checkpoint_sha = preflight(options.model, options.checkpoint, output, storage_options)
    provenance = {
        "model": options.model,
        "checkpoint_sha256": checkpoint_sha,
        "mode": everything.mode,
        "params": everything.provenance_json(),
    }
    if options.polygons is not None:  # rows with and without polygons never share an output
        provenance["polygons"] = asdict(options.polygons)
    audit = options.audit
    if audit is not None:  # a run with another audit is another run: refused, or --overwrite
        audit_sha = preflight(audit.model, audit.checkpoint, output, storage_options)
        provenance["audit"] = {"model": audit.model, "checkpoint_sha256": audit_sha, "fraction": audit.fraction}
    if options.embeddings:
        plan, files = pending_stored(
            options.embeddings, output, provenance, corpus.limit, corpus.overwrite, storage_options
        )
    else:
        plan = plan_inputs(corpus.input, output, provenance, corpus.limit, corpus.overwrite, storage_options)
    if corpus.overwrite:
        delete_other_audits(output, provenance, storage_options)
    summary = AutomaskSummary()
    if plan.files or plan.shards:
        actor_kwargs = {
            "model_type": options.model,
            "checkpoint": options.checkpoint,
            "everything": everything,
            "memory_gb": corpus.actor_memory_gb,
            "audit": options.audit,
            "polygons": options.polygons,
        }
        write_kwargs = {"output": output, "provenance": provenance, "sa1b_json": options.sa1b_json}
        stage = ModelStage(
            AutoMasker, actor_kwargs, write_batch, write_kwargs, corpus.rows_per_file or default_rows_per_file()
        )
        if options.embeddings:
            ds = model_and_write(stored_embedding_rows(plan, files, corpus.batch_size, storage_options), stage, corpus)
        else:
            ds = image_pipeline(plan, stage, corpus, keep_original=bool(everything.crop_n_layers))

        def count(result: Dict[str, np.ndarray], i: int) -> None:
            summary.masks += int(result["num_masks"][i])
            summary.encode_seconds += float(result["encode_seconds"][i])
            summary.generate_seconds += float(result["generate_seconds"][i])

        run_to_output(ds, summary, output, corpus.max_failures, on_row=count)
    finish_summary(summary, plan, output, storage_options)
    if audit is not None:
        summarise_audit(summary, read_audit(output, provenance, storage_options), audit.worst)
    if options.coco_json:
        write_coco_results(output, options.coco_json, storage_options)
    if options.preview:
        write_previews(output, options.preview, storage_options)
    return summary


def summarise_audit(summary: AutomaskSummary, table, worst: int) -> None:
    """The corpus-level agreement with the teacher and the `worst` least agreeing images."""
    rows = sorted(
        table.select(["image_id", "source", "agreement", "found", "missed"]).to_pylist(), key=lambda r: r["agreement"]
    )
    summary.audited = len(rows)
    summary.audit_agreement = float(np.mean([r["agreement"] for r in rows])) if rows else None
    summary.audit_worst = rows[:worst]
