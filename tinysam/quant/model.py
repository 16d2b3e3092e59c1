"""Quantize a whole model, and save / load the result as plain tensors (never a pickled module).

The file holds the float model's state dict in the official layout plus, per quantized layer,
its scales and activation kind; `torch.load(..., weights_only=True)` reads it. Loading rebuilds
the model from the registry, loads the weights strictly, converts it and applies the scales.
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch

from ..build_sam import MODEL_CONFIGS, TinyViTConfig, build_sam, load_into
from ..modeling.sam import Sam
from ..transforms import prepare_image
from ..weights import CheckpointError, save_atomic
from .calibrate import QuantConfig, Recorder, record, search_scales
from .layers import convert, quant_layers, set_mode

FORMAT = "tinysam-quant/1"
SCOPES = ["image_encoder", "mask_decoder"]


@dataclass
class QuantReport:
    config: QuantConfig
    layers: Dict[str, Dict[str, object]]  # per layer: chosen ratios and distances before / after
    seconds: float
    recorder: Optional[Recorder] = field(default=None, repr=False)  # the calibration samples, for re-searching

    @property
    def quantized(self) -> int:
        return sum(1 for v in self.layers.values() if v.get("alpha") is not None)


def check_quantizable(model_type: str) -> None:
    if not isinstance(MODEL_CONFIGS.get(model_type), TinyViTConfig):
        raise ValueError(f"quantization supports the TinyViT models (vit_t, TinySAM); got {model_type!r}")


def quantize_sam(
    sam: Sam,
    images: Sequence[np.ndarray],
    config: Optional[QuantConfig] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> QuantReport:
    """Convert `sam` in place, calibrate on the first `config.calibration_images` images (HxWx3 or
    any layout `prepare_image` takes) and leave it in simulated-quantization mode."""
    config = config or QuantConfig()
    if not images:
        raise ValueError("quantization needs at least one calibration image")
    t0 = time.time()
    sam.eval()
    convert(sam, config.bits, SCOPES)
    xs = [prepare_image(img, sam.image_encoder.img_size).tensor[None] for img in images[: config.calibration_images]]
    rec = record(sam, xs, config, progress)
    layers = search_scales(sam, rec, config, progress)
    set_mode(sam, "sim")
    return QuantReport(config, layers, time.time() - t0, rec)


def quant_params(sam: Sam) -> Dict[str, Dict[str, object]]:
    """The calibrated layers' scales and kinds, by module path."""
    return {name: layer.qparams() for name, layer in quant_layers(sam).items() if layer.calibrated}


def save_quantized(sam: Sam, path: Union[str, os.PathLike], model_type: str, config: QuantConfig) -> Path:
    """Write weights + quantization parameters atomically; returns the path."""
    payload = {
        "format": FORMAT,
        "model_type": model_type,
        "bits": config.bits,
        "config": config.as_dict(),
        "state_dict": {k: v.detach().clone() for k, v in sam.state_dict().items()},
        "qparams": quant_params(sam),
    }
    return save_atomic(payload, path)


def load_quantized(path: Union[str, os.PathLike], mode: str = "sim") -> Sam:
    """Read a file written by `save_quantized` (weights_only) and return the model in `mode`
    ("sim" for simulated quantization, "int8" for the integer kernels, "float")."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file, whatever the reader says
        raise CheckpointError(f"{path}: not a readable quantized model: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file (write it with jobs/quantize.py)")
    model_type = payload["model_type"]
    check_quantizable(model_type)
    sam = build_sam(model_type)
    load_into(sam, payload["state_dict"], label=str(path))
    layers = convert(sam, int(payload["bits"]), SCOPES)
    unknown = sorted(set(payload["qparams"]) - set(layers))
    if unknown:
        raise CheckpointError(f"{path}: quantization parameters for layers the model lacks: {unknown[:3]}")
    for name, params in payload["qparams"].items():
        layers[name].load_qparams(params)
    set_mode(sam, mode)
    return sam.eval()
