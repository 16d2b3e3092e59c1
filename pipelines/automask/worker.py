"""The auto-masking model actor: the model and its everything-mode generator loaded once; the
masks of every image of a batch, each image's failure its own."""

import json
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from tinysam.everything import EverythingConfig

from ..actors import SamActor
from ..stages import ok_rows

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
    ) -> None:
        # fp32 encoder: bf16 embeddings changed the masks (docs/benchmarks.md, "On a GPU")
        super().__init__(model_type, checkpoint, device, cpu_threads, bf16=False, memory_gb=memory_gb)
        self.generator = everything.generator(self.sam, output_mode="coco_rle")  # the records the job stores

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        with torch.inference_mode():
            return self._masks(batch)

    def _masks(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        ok = ok_rows(batch)
        rows = np.flatnonzero(ok)
        masks = [""] * len(ok)
        errors = [str(e) for e in batch["error"]]
        timing = [0.0, 0.0]
        if rows.size:
            try:
                records = self._generate(batch, rows, timing)
            except Exception:  # one image must not fail its batch: each alone, its own error if it fails
                records = []
                for i in rows:
                    try:
                        records += self._generate(batch, np.array([i]), timing)
                    except Exception as e:
                        records.append(None)
                        errors[i] = f"{batch['source'][i]}: everything mode failed ({type(e).__name__}: {e})"[:2000]
            for i, recs in zip(rows, records):
                masks[i] = "" if recs is None else json.dumps(recs)
        out = {k: v for k, v in batch.items() if k in PASSED_THROUGH}
        out["error"] = np.array(errors, dtype=object)
        out["masks"] = np.array(masks, dtype=object)
        share = np.where(ok, 1.0 / max(1, rows.size), 0.0)
        out["encode_seconds"] = share * timing[0]
        out["generate_seconds"] = share * timing[1]
        return out

    def _generate(self, batch: Dict[str, np.ndarray], rows: np.ndarray, timing: List[float]) -> List[list]:
        """Mask records of the prepared rows `rows`; adds encoder and generator seconds to `timing`."""
        start = time.perf_counter()
        if self.generator.crop_n_layers:  # crops are encoded from the full-resolution image
            records = self.generator.generate_batch([batch["image"][i] for i in rows])
            timing[1] += time.perf_counter() - start
            return records
        if "embedding" in batch:
            embeddings = torch.as_tensor(np.stack([batch["embedding"][i] for i in rows]))
        else:
            embeddings = self.encode(batch, rows)
        timing[0] += time.perf_counter() - start
        start = time.perf_counter()
        records = self.generator.generate_from_embeddings(
            embeddings,
            list(zip(batch["input_h"][rows], batch["input_w"][rows])),
            list(zip(batch["orig_h"][rows], batch["orig_w"][rows])),
        )
        timing[1] += time.perf_counter() - start
        return records
