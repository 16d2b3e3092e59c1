"""Export a SAM-family model to ONNX: the image encoder and the prompt encoder + mask decoder (the
official SAM ONNX interface: an application written against `sam_onnx_example` runs the decoder
file unchanged). Both files are checked with onnx.checker and carry inferred shapes.

    python jobs/export_onnx.py --model vit_t --checkpoint mobile_sam --output onnx/
    -> onnx/vit_t_encoder.onnx, onnx/vit_t_decoder.onnx
    python jobs/export_onnx.py --quantized q_tinysam_w8a8.pt --output onnx/
    -> onnx/vit_t_w8a8_encoder.onnx, onnx/vit_t_w8a8_decoder.onnx (QDQ: the file's own scales)
    python jobs/export_onnx.py --checkpoint mobile_sam --int8 --output onnx/
    -> onnx/vit_t_int8_encoder.onnx, onnx/vit_t_int8_decoder.onnx (ONNX Runtime's integer kernels)

Run them with `tinysam.export.OnnxSamPredictor` (ONNX Runtime). Exit status: 0 written, 2 refused
(unknown model, unreadable or mismatched checkpoint, unwritable output).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import add_checkpoint_argument, job_parser  # noqa: E402
from pipelines.storage.files import ensure_writable  # noqa: E402
from tinysam.build_sam import MODEL_CONFIGS, build_sam  # noqa: E402
from tinysam.weights import CheckpointError  # noqa: E402


def main(argv=None) -> int:
    p = job_parser(__doc__, exit_codes=None)
    p.add_argument("--model", default="vit_t", help=f"model type ({', '.join(sorted(MODEL_CONFIGS))})")
    source = p.add_mutually_exclusive_group(required=True)
    # no default: 'none' (None) must still count as given for the group
    add_checkpoint_argument(source, required=False, default=argparse.SUPPRESS)
    source.add_argument(
        "--quantized", help="a jobs/quantize.py file: W8A8 as QuantizeLinear/DequantizeLinear pairs, its own scales"
    )
    p.add_argument("--output", required=True, help="folder for <model>_encoder.onnx and <model>_decoder.onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--parts", default="encoder,decoder", help="comma-separated: encoder,decoder")
    p.add_argument("--fp16", action="store_true", help="float16 weights, arithmetic, inputs and outputs")
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="with --quantized or --int8: weights held to 7 bits, for int8 kernels on CPUs without VNNI "
        "(AVX2; --int8 does so by default on such a CPU)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="int8 products that ONNX Runtime runs as integer kernels (scales from each call's input; "
        "no calibration): tinysam.export.int8",
    )
    p.add_argument(
        "--all-masks", action="store_true", help="decoder returns all 4 masks (official return_single_mask=False)"
    )
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    try:
        if args.model not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {args.model!r}: one of {', '.join(sorted(MODEL_CONFIGS))}")
        if args.opset < 17:
            raise ValueError(f"opset {args.opset}: 17 or later (LayerNormalization)")
        if args.fp16 and args.quantized:
            raise ValueError("--fp16 and --quantized: a W8A8 file exports with float32 around its QDQ pairs")
        if args.int8 and (args.fp16 or args.quantized):
            raise ValueError("--int8 quantizes a float model: give it --checkpoint, without --fp16 or --quantized")
        if not parts <= {"encoder", "decoder"}:
            raise ValueError(f"--parts: encoder and/or decoder, got {args.parts!r}")
        out = Path(args.output)
        ensure_writable(str(out))
        if args.quantized:
            from tinysam.quant import load_quantized

            bits = "w7a8" if args.reduce_range else "w8a8"
            model, name = load_quantized(args.quantized, mode="sim"), f"{args.model}_{bits}"
        else:
            model, name = build_sam(args.model, getattr(args, "checkpoint", None)).eval(), args.model
    except (CheckpointError, FileNotFoundError, PermissionError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tinysam.export import export_decoder, export_encoder

    name += "_fp16" if args.fp16 else "_int8" if args.int8 else ""
    qdq_7bit = args.reduce_range and not args.int8  # --int8 quantizes the float export afterwards
    exports = {
        "encoder": lambda path: export_encoder(model, path, args.opset, reduce_range=qdq_7bit, fp16=args.fp16),
        "decoder": lambda path: export_decoder(
            model, path, args.opset, not args.all_masks, reduce_range=qdq_7bit, fp16=args.fp16
        ),
    }
    for part in ("encoder", "decoder"):
        if part not in parts:
            continue
        path = str(out / f"{name}_{part}.onnx")
        if args.int8:
            from tinysam.export.int8 import quantize_onnx_int8

            with tempfile.TemporaryDirectory() as folder:
                reduce_range = True if args.reduce_range else None  # None: as this CPU needs
                print(quantize_onnx_int8(exports[part](f"{folder}/fp32.onnx"), path, reduce_range))
        else:
            print(exports[part](path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
