"""Post-training quantization (Q-TinySAM): W8A8 by default, the paper's Hessian-guided scale search.

    python jobs/quantize.py --checkpoint mobile_sam --calibration photos/ --output q_tinysam.pt
    python jobs/quantize.py --checkpoint tinysam_42.3.pth --calibration s3://bucket/sa1b/ --bits 6 --output w6.pt

Writes one file (weights in the official layout + per-layer scales, tensors only: readable with
torch.load(weights_only=True)); load it with tinysam.quant.load_quantized(path, mode="sim" or "int8").
Exit status: 0 written, 2 refused (bad arguments, checkpoint, or no readable calibration image).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.cli import add_checkpoint_argument, job_parser
from tinysam.quant import QuantConfig
from tinysam.weights import CheckpointError


def main(argv=None) -> int:
    d = QuantConfig()
    p = job_parser(__doc__, exit_codes=None)
    p.add_argument("--model", default="vit_t", help="model type (a TinyViT model: vit_t)")
    add_checkpoint_argument(p)
    p.add_argument("--calibration", required=True, help="folder, s3:// prefix, list or SA-1B shard of images")
    p.add_argument("--output", required=True, help="file to write (local path)")
    p.add_argument("--bits", type=int, default=d.bits, help="weights and activations (8; 6 supported)")
    p.add_argument("--num-images", type=int, default=d.calibration_images, help="calibration images")
    p.add_argument("--theta-low", type=float, default=d.theta_low)
    p.add_argument("--theta-high", type=float, default=d.theta_high)
    p.add_argument("--candidates", type=int, default=d.candidates, help="grid points n per search")
    p.add_argument("--rounds", type=int, default=d.rounds, help="alternating rounds (A, then B)")
    p.add_argument(
        "--points-per-side",
        type=int,
        default=d.points_per_side,
        help="calibration prompts per image: a grid of points, plus two boxes per point",
    )
    p.add_argument("--max-scaling", action="store_true", help="no search: plain max-scaling (the baseline)")
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)

    from pipelines.quantize import quantize_checkpoint

    try:
        config = QuantConfig(
            bits=args.bits,
            theta_low=args.theta_low,
            theta_high=args.theta_high,
            candidates=args.candidates,
            rounds=args.rounds,
            calibration_images=args.num_images,
            points_per_side=args.points_per_side,
            search=not args.max_scaling,
            seed=args.seed,
        )
        summary = quantize_checkpoint(
            args.model, args.checkpoint, args.calibration, args.output, config, progress=lambda m: print(m, flush=True)
        )
    except (CheckpointError, FileNotFoundError, PermissionError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summary
    print(
        f"W{s.bits}A{s.bits}: {s.layers_quantized} layers {s.kinds}, calibrated on {len(s.calibration)} images "
        f"({len(s.skipped)} skipped), Hessian-weighted distance {s.distance_ratio:.3f}x max-scaling's, "
        f"{s.seconds:.0f} s -> {s.output}"
    )
    print("SUMMARY " + json.dumps(s.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
