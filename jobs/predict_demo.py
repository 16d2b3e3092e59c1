"""Predictor demo: segment sample photos from point and box prompts with the real MobileSAM weights.

python jobs/predict_demo.py --checkpoint mobile_sam --output demo_output [--model vit_t]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's code

from pipelines.cli import add_checkpoint_argument, job_parser  # noqa: E402
from tinysam_samples.predictor_demo import run_predictor_demo  # noqa: E402


def main() -> None:
    parser = job_parser(__doc__, exit_codes=None)
    parser.add_argument("--output", type=Path, default=Path("demo_output"), help="folder for overlays and masks.json")
    add_checkpoint_argument(parser)
    parser.add_argument("--model", default="vit_t", help="model type: vit_t, vit_b, vit_l, vit_h")
    args = parser.parse_args()
    summary = run_predictor_demo(args.output, args.checkpoint, args.model)
    print(f"{summary['images']} images, {summary['masks']} masks in {summary['seconds']:.1f} s")
    for path in summary["files"]:
        print(f"  wrote {path}")


if __name__ == "__main__":
    main()
