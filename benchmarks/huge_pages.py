"""PyTorch's huge-page allocation (`THP_MEM_ALLOC_ENABLE`, on in the distillation workers) on a CPU
distillation step, off vs on side by side in one run.

The `Distiller` loop of benchmarks/distill.py (vit_t_mini student, vit_t teacher, real photos with
pseudo labels) runs in child processes that alternate the setting (off, on, off, on: the machine
drifts; the variable is read once per process). Each prints the median step time, minor page faults
and kernel CPU time per step (process-wide).

    python benchmarks/huge_pages.py [--steps 5] [--rounds 2] [--threads 2] [--data DIR]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import benchmark_parser  # benchmarks/ is on sys.path
from distill import DATA_HELP, HUGE_PAGES_ENV, in_process, prepare  # benchmarks/distill.py (this folder is on sys.path)

from tinysam_samples import SAMPLE_PHOTOS


def child(embeddings: str, student: str, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    print(json.dumps(in_process(embeddings, student, steps)))


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=5, help="per child; the first is left out")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--student", default="vit_t_mini")
    parser.add_argument("--data", metavar="DIR", help=DATA_HELP)
    parser.add_argument("--child", metavar="EMBEDDINGS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.threads = 2, 1, 1
    if args.child:
        return child(args.child, args.student, args.steps, args.threads)
    work = Path(tempfile.mkdtemp(prefix="tinysam-bench-"))
    try:
        embeddings = prepare(
            Path(args.data or work / "data"),
            SAMPLE_PHOTOS[: 2 if args.smoke else 4],
            args.threads,
            4 if args.smoke else 8,
        )
        runs = {"0": [], "1": []}
        for r in range(args.rounds):
            for value in ("0", "1"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        embeddings,
                        "--steps",
                        str(args.steps),
                        "--threads",
                        str(args.threads),
                        "--student",
                        args.student,
                    ],
                    env={**os.environ, HUGE_PAGES_ENV: value},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[value].append(json.loads(out.stdout.strip().splitlines()[-1]))
                m = runs[value][-1]
                print(
                    f"round {r} {HUGE_PAGES_ENV}={value}: {m['step_seconds']:.3f} s/step, "
                    f"{m['minor_faults']:.0f} minor faults, {m['kernel_seconds']:.2f} s in the kernel",
                    flush=True,
                )
        off, on = (statistics.mean(m["step_seconds"] for m in runs[v]) for v in ("0", "1"))
        print(f"{args.student} student, {args.threads} threads, {args.steps - 1} steps x {args.rounds} rounds each")
        print(f"  huge pages off: {off:.3f} s/step   on: {on:.3f} s/step   on/off: {on / off:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
