"""int8 ONNX files that ONNX Runtime's CPU provider runs as integer kernels: every product with a
constant weight (the linears of the encoder and of the decoder) becomes a dynamically quantized
product, int8 per-channel weights and uint8 activations whose scale is taken from each call's own
input.

Why dynamic and not static QDQ: with static activation scales (ONNX Runtime's `quantize_static`,
MinMax or percentile calibration) the TinyViT convolutions of the first stage and of the
downsampling blocks lose most of the embedding (box-mask agreement with fp32 ~0.6), and the MLP's
second linear, fed by GELU's long-tailed output, loses more than the rest; a scale measured on
each call's input has no such outliers to cover. ONNX Runtime fuses the dynamic form into
`DynamicQuantizeMatMul` / `MatMulIntegerToFloat` (u8 x s8: VNNI and AMX kernels), so no standalone
QuantizeLinear / DequantizeLinear pass is left in the graph. See docs/design.md ("int8 on ONNX
Runtime") for the alternatives measured."""

import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from .to_onnx import staged_file

# Products whose second input is a constant weight: the ones quantized. MatMuls between two
# activations (attention scores) stay float: both sides would be quantized at run time for a small
# share of the time.
QUANTIZED_OPS = ("MatMul", "Gemm")


def quantize_onnx_int8(fp32_path: str, path: str, reduce_range: Optional[bool] = None) -> str:
    """Write an int8 copy of the fp32 ONNX file `fp32_path` (encoder or decoder, from
    `export_encoder` / `export_decoder`) at `path`, which appears only when complete.

    `reduce_range`: weights held to 7 bits, for CPUs without VNNI, whose u8 x s8 kernels sum pairs
    in saturating 16-bit lanes (docs/design.md, "W8A8 in ONNX"); by default, when this CPU has no
    VNNI, as a file is most often run where it is made."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not Path(fp32_path).is_file():
        raise FileNotFoundError(f"{fp32_path}: no such ONNX file")
    with staged_file(path) as tmp:
        quantize_dynamic(
            fp32_path,
            tmp,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=fourier_features(fp32_path),
            per_channel=True,
            reduce_range=_lacks_vnni() if reduce_range is None else reduce_range,
            weight_type=QuantType.QInt8,
            # Only products with a constant weight: a MatMul of two activations is left float.
            extra_options={"MatMulConstBOnly": True},
        )
    return path


def _lacks_vnni() -> bool:
    """No VNNI here (or a CPU PyTorch cannot describe): the same test as PyTorch's int8 mode."""
    from ..quant.layers import int8_unavailable_reason

    return int8_unavailable_reason() is not None


def fourier_features(path: str, hops: int = 3) -> List[str]:
    """Products in `path` whose output reaches a Sin or Cos within `hops` nodes: the random
    Fourier features of SAM's positional encoding. They stay float, as an int8 error in a phase
    of tens of radians is not small."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    consumers: Dict[str, List] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reaches_phase(node, depth: int) -> bool:
        if node.op_type in ("Sin", "Cos"):
            return True
        return depth > 0 and any(reaches_phase(c, depth - 1) for o in node.output for c in consumers.get(o, []))

    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and reaches_phase(n, hops)]


def kernel_counts(path: str, threads: int = 1) -> Dict[str, int]:
    """Node counts by op type of `path` as ONNX Runtime's CPU provider runs it (its optimized
    graph, written to a temporary file): the place to check that products became integer
    kernels."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    counts: Dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
