"""Export a SAM-family model to ONNX: the image encoder, and the prompt encoder + mask decoder with
the official interface. Each file is checked with `onnx.checker`, saved with inferred shapes, and
appears only when complete."""

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

from ..modeling import Sam
from .modules import DECODER_INPUTS, DECODER_OUTPUTS, SamOnnxDecoder, SamOnnxEncoder

OPSET = 17


def export_encoder(
    model: Sam,
    path: str,
    opset: int = OPSET,
    dynamic_batch: bool = True,
    reduce_range: bool = False,
    fp16: bool = False,
) -> str:
    """The image encoder as ONNX: input `image` (B, 3, S, S), output `image_embeddings`; float32,
    or with `fp16` weights, arithmetic, input and output in float16 (a half copy of the model is
    exported). `reduce_range`: a quantized model's weights held to 7-bit codes (int8 kernels
    without VNNI)."""
    model = _half(model) if fp16 else model
    size = model.image_encoder.img_size
    example = (torch.randn(1, 3, size, size, dtype=torch.float16 if fp16 else torch.float32),)
    axes = {"image": {0: "batch"}, "image_embeddings": {0: "batch"}} if dynamic_batch else None
    return _export(
        SamOnnxEncoder(model).eval(), example, path, ["image"], ["image_embeddings"], axes, opset, reduce_range
    )


def export_decoder(
    model: Sam,
    path: str,
    opset: int = OPSET,
    return_single_mask: bool = True,
    reduce_range: bool = False,
    fp16: bool = False,
) -> str:
    """Prompt encoder + mask decoder as ONNX, with the inputs and outputs of the official SAM export
    (a dynamic number of points, and of prompts). With `fp16` every input and output is float16
    except `orig_im_size`, which stays float32 (float16 would round sizes above 2048)."""
    model = _half(model) if fp16 else model
    dtype = torch.float16 if fp16 else torch.float32
    embed_dim = model.prompt_encoder.embed_dim
    h, w = model.prompt_encoder.image_embedding_size
    example = (
        torch.randn(1, embed_dim, h, w, dtype=dtype),
        torch.randint(0, 1024, (1, 5, 2)).to(dtype),
        torch.randint(0, 4, (1, 5)).to(dtype),
        torch.randn(1, 1, 4 * h, 4 * w, dtype=dtype),
        torch.tensor([1], dtype=dtype),
        torch.tensor([1500, 2250], dtype=torch.float),
    )
    # The official export's dynamic point count, plus a dynamic prompt count (dimension 0, 1 in the
    # official example): many prompts share one image's embedding in one call.
    axes = {
        "point_coords": {0: "num_prompts", 1: "num_points"},
        "point_labels": {0: "num_prompts", 1: "num_points"},
        **{name: {0: "num_prompts"} for name in DECODER_OUTPUTS},
    }
    module = SamOnnxDecoder(model, return_single_mask=return_single_mask).eval()
    return _export(module, example, path, list(DECODER_INPUTS), list(DECODER_OUTPUTS), axes, opset, reduce_range)


def _half(model: Sam) -> Sam:
    """A float16 copy of `model` (the caller's model is left as it is)."""
    import copy

    return copy.deepcopy(model).half().eval()


def _export(
    module, example, path: str, inputs, outputs, axes: Optional[Dict], opset: int, reduce_range: bool = False
) -> str:
    """Trace `module` to ONNX, check the graph, infer its shapes, and put it at `path` in one step
    (`staged_file`)."""
    import onnx

    from ..quant.layers import export_weight_bits

    with staged_file(path) as tmp:
        with export_weight_bits(7 if reduce_range else 8), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on Python-side shape arithmetic
            torch.onnx.export(
                module,
                example,
                tmp,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(tmp)
        onnx.checker.check_model(model)
        onnx.save(onnx.shape_inference.infer_shapes(model), tmp)
    return path


@contextlib.contextmanager
def staged_file(path: str) -> Iterator[str]:
    """A temporary file beside `path` to write the file into; it becomes `path` in one step when
    the block ends, and is removed if the block fails: a failed export leaves nothing behind."""
    folder = Path(path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".onnx.tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
