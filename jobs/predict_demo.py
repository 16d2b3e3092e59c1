"""Predictor demo: segment sample photos from point and box prompts with the real MobileSAM weights.

python jobs/predict_demo.py --output demo_output [--checkpoint mobile_sam] [--model vit_t]
"""

import argparse
from pathlib import Path

from tinysam.demo import run_predictor_demo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--output", type=Path, default=Path("demo_output"), help="folder for overlays and masks.json")
    parser.add_argument("--checkpoint", default="mobile_sam", help="known name, path, http(s):// or s3:// URL")
    parser.add_argument("--model", default="vit_t", help="model type: vit_t, vit_b, vit_l, vit_h")
    args = parser.parse_args()
    summary = run_predictor_demo(args.output, args.checkpoint, args.model)
    print(f"{summary['images']} images, {summary['masks']} masks in {summary['seconds']:.1f} s")
    for path in summary["files"]:
        print(f"  wrote {path}")


if __name__ == "__main__":
    main()
