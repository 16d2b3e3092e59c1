"""Post-training quantization as a job: calibration images from any corpus, the search, the file.

Calibration is small (8 images by default) and runs in one process; reading goes through the
same sources as the Ray jobs (folders, s3:// prefixes, lists, SA-1B shards). An image that cannot
be read is reported and the next one is taken, so a corrupt file never stops a run.
"""

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from tinysam.build_sam import build_sam
from tinysam.quant import QuantConfig, check_quantizable, quantize_sam, save_quantized
from tinysam.transforms import to_rgb_uint8

from .sources import decode_image, iter_images


@dataclass
class QuantizeSummary:
    output: str
    model_type: str
    bits: int
    calibration: List[str]
    layers_quantized: int
    kinds: Dict[str, int]  # layers per activation quantizer: plain, softmax / gelu twin scales
    distance_ratio: float  # searched / max-scaling Hessian-weighted distance, summed over layers
    seconds: float
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def calibration_images(
    spec: str, count: int, storage_options: Optional[Dict[str, Any]] = None
) -> Tuple[List[np.ndarray], List[str], List[Tuple[str, str]]]:
    """The first `count` readable images of `spec` (sorted), their sources and the skipped ones."""
    images, used, skipped = [], [], []
    for ref, data, _ in iter_images(spec, storage_options):  # tar shards in one pass each
        if len(images) == count:
            break
        try:
            images.append(to_rgb_uint8(decode_image(data, ref.source), ref.source))
            used.append(ref.source)
        except (OSError, ValueError) as e:
            skipped.append((ref.source, str(e)))
    if not images:
        raise ValueError(f"{spec}: no readable calibration image")
    return images, used, skipped


def quantize_checkpoint(
    model_type: str,
    checkpoint: Optional[str],
    calibration: str,
    output: str,
    config: QuantConfig,
    storage_options: Optional[Dict[str, Any]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> QuantizeSummary:
    """Load a checkpoint, calibrate on `config.calibration_images` images of `calibration`,
    write the quantized model to `output` (a local path)."""
    t0 = time.time()
    check_quantizable(model_type)
    sam = build_sam(model_type, checkpoint)
    images, used, skipped = calibration_images(calibration, config.calibration_images, storage_options)
    for source, error in skipped:
        if progress:
            progress(f"skipped {source}: {error}")
    report = quantize_sam(sam, images, config, progress)
    save_quantized(sam, output, model_type, config)
    searched = [v for v in report.layers.values() if v.get("alpha") is not None]
    kinds: Dict[str, int] = {}
    for v in searched:
        kinds[v["kind"] or "plain"] = kinds.get(v["kind"] or "plain", 0) + 1
    before = sum(v["distance_max_scaling"] for v in searched)
    after = sum(v["distance"] for v in searched)
    return QuantizeSummary(
        output,
        model_type,
        config.bits,
        used,
        len(searched),
        kinds,
        after / before if before else 1.0,
        time.time() - t0,
        skipped,
    )
