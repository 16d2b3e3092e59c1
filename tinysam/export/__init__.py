"""ONNX export of the SAM-family models and inference on ONNX Runtime (optional extra: `onnx`).

`export_encoder` / `export_decoder` write the image encoder and the prompt encoder + mask decoder
(the official SAM ONNX interface); `OnnxSamPredictor` runs them with `SamPredictor`'s API."""

from .runtime import OnnxSamPredictor
from .to_onnx import OPSET, export_decoder, export_encoder

__all__ = ["OPSET", "OnnxSamPredictor", "export_decoder", "export_encoder"]
