"""The GPU path, checked and timed in one run on one card: encoders in fp32 vs bf16 autocast and
explicit vs fused attention (speed, memory, embedding error), everything mode on the GPU (speed,
masks from bf16 vs fp32 embeddings and from the bfloat16 decoder), the two Ray jobs' GPU actor
pools vs a bare loop on the same card (images/s, GPU utilisation), and last SAM-H compiled by
Inductor, alone and in the precompute job (--compile).

    python benchmarks/gpu_check.py [--vit-t-checkpoint mobile_sam] [--out DIR] [--budget-s 480]

Needs a CUDA GPU (`--smoke-cpu` runs every section on the CPU at toy sizes, to check the script
before a lease). SAM-H runs with random weights of the real shapes (its speed does not depend on
the values). Each section reports its own failure and the run goes on; a section whose estimate
does not fit in what is left of `--budget-s` is skipped, so the run ends inside a device lease.
Results go to DIR/gpu_check.json after every section; the summary comes last.
"""

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import _gpu_run as run  # benchmarks/ is on sys.path
import torch
from _gpu import save, section
from _gpu_encoders import compiled_encoder_speed, encoder_speed, flex_compile_probe
from _gpu_jobs import automask_on_gpu, distill_on_gpu, everything_on_gpu, everything_settings, precompute_on_gpu
from _harness import benchmark_parser

from pipelines.runtime import init_ray
from tinysam.everything.config import GPU_EXECUTION


def main() -> None:
    parser = benchmark_parser(__doc__, smoke=False)
    parser.add_argument("--vit-t-checkpoint", default="mobile_sam")
    parser.add_argument("--teacher-images", type=int, default=512)
    parser.add_argument("--teacher-batch", type=int, default=16)
    parser.add_argument("--automask-images", type=int, default=96)
    parser.add_argument("--out", default=None, help="folder for gpu_check.json (written after every section)")
    parser.add_argument(
        "--sections", default="encoders,everything,settings,automask,precompute,flex,compile,precompute_compiled"
    )
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=480, help="skip sections that would end after this")
    parser.add_argument("--smoke-cpu", action="store_true", help="every section on the CPU at toy sizes")
    args = parser.parse_args()
    run.DEADLINE = time.monotonic() + args.budget_s
    run.OUT_DIR = args.out
    if args.smoke_cpu:
        run.DEVICE, run.SMOKE = "cpu", True
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; the CPU figures are in the other benchmarks")
    gpu = torch.cuda.get_device_name(0) if run.DEVICE == "cuda" else "none (smoke run)"
    run.RESULTS["env"] = {"gpu": gpu, "torch": torch.__version__}
    print(run.RESULTS["env"], flush=True)
    work = Path(tempfile.mkdtemp(prefix="tinysam-gpu-"))
    settings = dict(GPU_EXECUTION)

    def teacher_job(compile: bool) -> Dict[str, Any]:
        images, batch = (2, 1) if run.SMOKE else (args.teacher_images, args.teacher_batch)
        return precompute_on_gpu(work, images, batch, compile=compile)

    try:
        wanted = args.sections.split(",")
        if "encoders" in wanted:
            section(
                "encoder_vit_h",
                lambda: encoder_speed(
                    "vit_h", None, [1] if run.SMOKE else [8, 16, 32], 1 if run.SMOKE else 5, [1 if run.SMOKE else 8]
                ),
                90,
            )
            section(
                "encoder_vit_t",
                lambda: encoder_speed(
                    "vit_t",
                    args.vit_t_checkpoint,
                    [1] if run.SMOKE else [1, 8, 32],
                    2 if run.SMOKE else 10,
                    [8],
                ),
                20,
            )
        if "everything" in wanted:
            section("everything_vit_t", lambda: everything_on_gpu(args.vit_t_checkpoint), 60)
        if "settings" in wanted:
            section(
                "everything_settings",
                lambda: everything_settings(args.vit_t_checkpoint, (1, 2) if run.SMOKE else (1, 4)),
                60,
            )
            best = run.RESULTS["everything_settings"].get("best")
            if best:
                ppb, chunk, up = (int(v) for v in re.findall(r"\d+", best)[:3])
                settings = {"points_per_batch": ppb, "decoder_chunk": chunk, "upsample_chunk": up}
        if "automask" in wanted:
            init_ray(num_cpus=2 if run.SMOKE else None)
            pools = [(1, 1)] if run.SMOKE else [(1, 4), (2, 4), (4, 3)]
            section(
                "automask_job_vit_t",
                lambda: automask_on_gpu(
                    work,
                    args.vit_t_checkpoint,
                    4 if run.SMOKE else args.automask_images,
                    2 if run.SMOKE else 4,
                    settings,
                    pools,
                ),
                90,
            )
        if "precompute" in wanted:
            init_ray(num_cpus=2 if run.SMOKE else None)
            section("precompute_job_vit_h", lambda: teacher_job(False), 70)
        if "distill" in wanted:
            init_ray()
            section("distill_vit_t", lambda: distill_on_gpu(work, args.vit_t_checkpoint, args.distill_steps), 120)
        if "flex" in wanted:
            section("flex_compile_probe", flex_compile_probe, 90)
        if "compile" in wanted:  # late: compiling SAM-H takes minutes
            section(
                "encoder_vit_h_compiled",
                lambda: compiled_encoder_speed([1] if run.SMOKE else [args.teacher_batch], 1 if run.SMOKE else 5),
                150,
            )
        if "precompute_compiled" in wanted:
            init_ray(num_cpus=2 if run.SMOKE else None)
            section("precompute_job_vit_h_compiled", lambda: teacher_job(True), 150)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        save()
    print("\nsummary")
    for name, res in run.RESULTS.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in res.items() if k != "traceback"))


if __name__ == "__main__":
    main()
