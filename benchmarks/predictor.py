"""SamPredictor with many prompts at once, side by side in one run: the official MobileSAM
predictor, ours with the official operation order (fast_decoder=False), ours by default (the folded
decoder).

The prompts are the evaluation protocols' on the real BBBC038 nuclei image: a box per nucleus
(125 in one call), then the same number of single points with the previous masks as mask inputs.
Per setting: the median of --repeats calls (interleaved, so drift hits all alike), the speed-up
over the official predictor, and the largest logit difference from it (relative to the largest logit).

    python benchmarks/predictor.py [--threads 1] [--repeats 3]
"""

import statistics
import time

import numpy as np
import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path

from tinysam import SamPredictor, build_sam
from tinysam.weights import resolve_checkpoint
from tinysam_samples import bbbc038, instance_masks


def main() -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.smoke:
        a.repeats = 1
    torch.set_num_threads(a.threads)
    from mobile_sam import SamPredictor as OfficialPredictor
    from mobile_sam import sam_model_registry

    image, labels = bbbc038()
    rgb = np.dstack([np.rint((image - image.min()) * 255.0 / np.ptp(image)).astype(np.uint8)] * 3)
    masks = list(instance_masks(labels))[: 8 if a.smoke else None]
    boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()] for ys, xs in (np.nonzero(m) for m in masks)], float)
    centers = np.array([[[xs.mean(), ys.mean()]] for ys, xs in (np.nonzero(m) for m in masks)])
    ours = build_sam("vit_t", "mobile_sam").eval()
    official = sam_model_registry["vit_t"](checkpoint=str(resolve_checkpoint("mobile_sam"))).eval()
    predictors = {
        "official": OfficialPredictor(official),
        "ours, official order": SamPredictor(ours, fast_decoder=False),
        "ours (default)": SamPredictor(ours),
    }
    for predictor in predictors.values():
        predictor.set_image(rgb)

    def boxes_call(predictor):
        return predictor.predict_torch(
            None,
            None,
            torch.as_tensor(predictor.transform.apply_boxes(boxes, rgb.shape[:2]), dtype=torch.float32),
            multimask_output=False,
            return_logits=True,
        )

    with torch.inference_mode():
        low_res = boxes_call(predictors["official"])[2]

    def points_call(predictor):
        coords = torch.as_tensor(predictor.transform.apply_coords(centers, rgb.shape[:2]), dtype=torch.float32)
        return predictor.predict_torch(
            coords,
            torch.ones(len(centers), 1, dtype=torch.int),
            None,
            low_res,
            multimask_output=False,
            return_logits=True,
        )

    print(f"BBBC038, {len(masks)} prompts per call, {a.threads} thread(s), median of {a.repeats}")
    for name, call in (("boxes", boxes_call), ("points + mask inputs", points_call)):
        times = {k: [] for k in predictors}
        outs = {}
        with torch.inference_mode():
            for _ in range(a.repeats):
                for k, predictor in predictors.items():
                    t = time.perf_counter()
                    outs[k] = call(predictor)[0]
                    times[k].append(time.perf_counter() - t)
        ref = outs["official"]
        base = statistics.median(times["official"])
        print(f"\n{name}:")
        for k in predictors:
            sec = statistics.median(times[k])
            diff = float((outs[k] - ref).abs().max() / ref.abs().max())
            print(f"  {k:22s} {sec:7.2f} s  x{base / sec:4.2f}  max |logit - official| / max |logit| {diff:.1e}")


if __name__ == "__main__":
    main()
