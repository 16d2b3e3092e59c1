"""The auto-masking model actor: the model and its everything-mode generator loaded once; the
masks of every image of a batch, each image's failure its own; with an audit, the teacher's masks
of the sampled images and their agreement with the model's."""

import json
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import torch

from tinysam.everything import EverythingConfig

from ..actors import SamActor
from ..stages import ok_rows
from ..storage.audit import is_audited

if TYPE_CHECKING:
    from tinysam.utils.polygons import PolygonRules

    from .options import AuditOptions

PASSED_THROUGH = ("image_id", "source", "source_offset", "source_length", "orig_h", "orig_w")


class AutoMasker(SamActor):
    """Ray actor: encoder in batches (or stored embeddings), then everything mode per image."""

    def __init__(
        self,
        model_type: str,
        checkpoint: Optional[str],
        everything: EverythingConfig,
        device: Optional[str] = None,
        cpu_threads: Optional[int] = None,
        memory_gb: Optional[float] = None,
        audit: Optional["AuditOptions"] = None,
        polygons: Optional["PolygonRules"] = None,
    ) -> None:
        # The teacher first: the memory cap (memory_gb) counts from what is mapped once both are loaded.
        # The same everything mode, so that only the model differs.
        teacher = None
        if audit is not None:
            teacher = SamActor(audit.model, audit.checkpoint, device, cpu_threads, bf16=False)
            teacher.generator = everything.generator(teacher.sam, output_mode="coco_rle")
        # fp32 encoder: bf16 embeddings changed the masks (docs/benchmarks.md, "On a GPU")
        super().__init__(model_type, checkpoint, device, cpu_threads, bf16=False, memory_gb=memory_gb)
        self.generator = everything.generator(self.sam, output_mode="coco_rle")  # the records the job stores
        self.audit, self.teacher, self.polygons = audit, teacher, polygons

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        with torch.inference_mode():
            return self._masks(batch)

    def _masks(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        ok = ok_rows(batch)
        rows = np.flatnonzero(ok)
        masks = [""] * len(ok)
        errors = [str(e) for e in batch["error"]]
        timing = [0.0, 0.0]
        audits = [""] * len(ok)
        if rows.size:
            try:
                records = self._generate(self, batch, rows, timing)
            except Exception:  # one image must not fail its batch: each alone, its own error if it fails
                records = []
                for i in rows:
                    try:
                        records += self._generate(self, batch, np.array([i]), timing)
                    except Exception as e:
                        records.append(None)
                        errors[i] = f"{batch['source'][i]}: everything mode failed ({type(e).__name__}: {e})"[:2000]
            if self.polygons is not None:
                from tinysam.utils.polygons import rle_to_polygons

                for recs in records:
                    for record in recs or []:
                        record["polygons"] = rle_to_polygons(record["segmentation"], self.polygons)
            for i, recs in zip(rows, records):
                masks[i] = "" if recs is None else json.dumps(recs)
            if self.audit is not None:
                audits = self._audit(batch, rows, records, audits)
        out = {k: v for k, v in batch.items() if k in PASSED_THROUGH}
        out["error"] = np.array(errors, dtype=object)
        out["masks"] = np.array(masks, dtype=object)
        out["audit"] = np.array(audits, dtype=object)
        share = np.where(ok, 1.0 / max(1, rows.size), 0.0)
        out["encode_seconds"] = share * timing[0]
        out["generate_seconds"] = share * timing[1]
        return out

    def _audit(self, batch: Dict[str, np.ndarray], rows: np.ndarray, records: List, audits: List[str]) -> List[str]:
        """The teacher's masks for the batch's sampled rows, and each one's agreement with the
        model's (JSON); a teacher failure leaves the row unaudited, its masks kept."""
        from tinysam.utils.metrics import rle_agreement

        sampled = [
            (i, r)
            for i, r in zip(rows, records)
            if r is not None and is_audited(batch["image_id"][i], self.audit.fraction)
        ]
        for i, student in sampled:
            try:
                teacher = self._generate(self.teacher, batch, np.array([i]), [0.0, 0.0])[0]
            except Exception:  # an audit must never cost the image its masks
                continue
            scores = rle_agreement([t["segmentation"] for t in teacher], [s["segmentation"] for s in student])
            audits[i] = json.dumps(
                {
                    "agreement": scores["agreement"],
                    "teacher_to_student": scores["reference_to_predicted"],
                    "student_to_teacher": scores["predicted_to_reference"],
                    "teacher_masks": scores["reference_masks"],
                    "student_masks": scores["predicted_masks"],
                    "found": scores["found"],
                    "missed": scores["missed"],
                    "unmatched": scores["unmatched"],
                }
            )
        return audits

    @staticmethod
    def _generate(model: SamActor, batch: Dict[str, np.ndarray], rows: np.ndarray, timing: List[float]) -> List[list]:
        """Mask records of the prepared rows `rows` by `model` (the actor itself, or its teacher);
        adds encoder and generator seconds to `timing`."""
        start = time.perf_counter()
        generator = model.generator
        if generator.crop_n_layers:  # crops are encoded from the full-resolution image
            records = generator.generate_batch([batch["image"][i] for i in rows])
            timing[1] += time.perf_counter() - start
            return records
        if "embedding" in batch:
            embeddings = torch.as_tensor(np.stack([batch["embedding"][i] for i in rows]))
        else:
            embeddings = model.encode(batch, rows)
        timing[0] += time.perf_counter() - start
        start = time.perf_counter()
        records = generator.generate_from_embeddings(
            embeddings,
            list(zip(batch["input_h"][rows], batch["input_w"][rows])),
            list(zip(batch["orig_h"][rows], batch["orig_w"][rows])),
        )
        timing[1] += time.perf_counter() - start
        return records
