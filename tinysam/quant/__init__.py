"""Post-training quantization (Q-TinySAM): W8A8 with the paper's Hessian-guided scale search,
simulated for accuracy and run on oneDNN's int8 kernels for speed (CPU)."""

from .calibrate import QuantConfig, task_loss
from .layers import compile_frozen, convert, int8_available, int8_unavailable_reason, quant_layers, set_mode
from .model import QuantReport, check_quantizable, load_quantized, quant_params, quantize_sam, save_quantized

__all__ = [
    "QuantConfig",
    "QuantReport",
    "check_quantizable",
    "compile_frozen",
    "convert",
    "int8_available",
    "int8_unavailable_reason",
    "load_quantized",
    "quant_layers",
    "quant_params",
    "quantize_sam",
    "save_quantized",
    "set_mode",
    "task_loss",
]
