"""gpu_check.py's shared pieces: sections within a deadline, timing on the device, GPU sampling,
the everything-mode comparisons."""

import json
import statistics
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import _gpu_run as run  # benchmarks/ is on sys.path
import numpy as np
import torch

from pipelines.sources import decode_image, list_images, read_bytes
from tinysam import build_sam
from tinysam.transforms import prepare_image, to_rgb_uint8
from tinysam.utils.metrics import best_match_ious
from tinysam_samples import sample_images


def sync() -> None:
    if run.DEVICE == "cuda":
        torch.cuda.synchronize()


def save() -> None:
    if run.OUT_DIR:
        Path(run.OUT_DIR).mkdir(parents=True, exist_ok=True)
        Path(run.OUT_DIR, "gpu_check.json").write_text(json.dumps(run.RESULTS, indent=1, default=str))


def section(name: str, fn: Callable[[], Dict[str, Any]], estimate_s: float = 60) -> None:
    """Run one section unless its estimated seconds do not fit before the deadline."""
    if time.monotonic() + estimate_s > run.DEADLINE:
        run.RESULTS[name] = {"skipped": f"needs ~{estimate_s:.0f} s, {run.DEADLINE - time.monotonic():.0f} s left"}
        print(name, run.RESULTS[name], flush=True)
        save()
        return
    start = time.perf_counter()
    try:
        run.RESULTS[name] = fn()
    except Exception as exc:  # one broken section must not hide the others' figures
        run.RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(run.RESULTS[name]["traceback"], flush=True)
    run.RESULTS[name]["section_seconds"] = round(time.perf_counter() - start, 1)
    print(name, json.dumps({k: v for k, v in run.RESULTS[name].items() if k != "traceback"}, default=str), flush=True)
    save()


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def on_gpu(model_type: str, checkpoint):
    with torch.device(run.DEVICE):  # random init on the GPU: seconds instead of a minute for SAM-H
        return build_sam(model_type, checkpoint).to(run.DEVICE).eval()


def encode(model, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast(run.DEVICE, dtype=torch.bfloat16, enabled=bf16):
        return model.image_encoder(x).float()


def real_batch(n: int) -> torch.Tensor:
    images = [im for _, im in sample_images()] * n
    return torch.stack([prepare_image(im).tensor for im in images[:n]]).to(run.DEVICE)


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if run.DEVICE == "cuda" else 0.0


def reset_peak() -> None:
    if run.DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


EVERYTHING_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def grid() -> int:
    """Everything mode's points per side: the default 32, or 4 in a CPU rehearsal (--smoke-cpu)."""
    return 4 if run.SMOKE else 32


def prepared_photos(names=EVERYTHING_PHOTOS):
    """The photos (in a CPU rehearsal, a 256x256 corner of each) and their prepared tensors."""
    images = [to_rgb_uint8(im, name) for name, im in sample_images(names)]
    if run.SMOKE:
        images = [np.ascontiguousarray(im[:256, :256]) for im in images]
    return images, [prepare_image(im) for im in images]


def timed_generate(gen, emb, prepared, images) -> tuple:
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        masks = gen.generate_from_embeddings(emb, [p.input_size for p in prepared], [im.shape[:2] for im in images])
    sync()
    return masks, time.perf_counter() - start


def decode(records: List[dict]) -> List[np.ndarray]:
    from pycocotools import mask as mask_utils

    return [mask_utils.decode(r["segmentation"]) for r in records]


def agreement(reference: List[dict], other: List[dict]) -> Dict[str, Any]:
    """Best IoU of each reference mask among `other`'s: mean and min, and the mask counts."""
    ious = best_match_ious(decode(reference), decode(other))
    return {
        "masks": [len(reference), len(other)],
        "mean_best_iou": round(float(np.mean(ious)), 4) if len(ious) else None,
        "min_best_iou": round(float(np.min(ious)), 4) if len(ious) else None,
    }


class GpuSampler:
    """GPU utilisation sampled every 0.2 s while a job runs (NVML)."""

    def __init__(self) -> None:
        self.nvml = None  # a smoke run on the CPU samples nothing
        if run.DEVICE == "cuda":
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: List[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.nvml and not self.stop.wait(0.2):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __enter__(self) -> "GpuSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> Dict[str, float]:
        busy = [s for s in self.samples if s > 0]
        return {
            "gpu_util_mean": round(float(np.mean(self.samples or [0])), 1),
            "gpu_util_mean_while_busy": round(float(np.mean(busy or [0])), 1),
        }


def loop_images_per_s(folder: Path, run_batch: Callable[[List[np.ndarray]], Any], batch_size: int) -> float:
    """Read, decode and run `run_batch` serially in this process (the job's baseline)."""
    refs = list_images(str(folder))
    # warm up at the batch sizes the timed loop will use: a first call at a new shape compiles
    for n in {batch_size, len(refs) % batch_size or batch_size}:
        run_batch([to_rgb_uint8(decode_image(read_bytes(r.source)[0], r.source), r.source) for r in refs[:n]])
    sync()
    start = time.perf_counter()
    for i in range(0, len(refs), batch_size):
        run_batch(
            [to_rgb_uint8(decode_image(read_bytes(r.source)[0], r.source), r.source) for r in refs[i : i + batch_size]]
        )
    sync()
    return len(refs) / (time.perf_counter() - start)


def first_errors(output: Path, n: int = 2) -> List[str]:
    from pipelines.storage.errors import read_errors

    return [str(e)[:600] for e in read_errors(str(output)).column("error").to_pylist()[:n]]
