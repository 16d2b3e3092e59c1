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

import argparse
import json
import re
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from pipelines.automask import automask
from pipelines.automask.worker import make_generator
from pipelines.precompute import precompute_embeddings
from pipelines.runtime import init_ray
from pipelines.sources import decode_image, list_images, read_bytes
from tinysam import build_sam
from tinysam.everything import EverythingConfig
from tinysam.everything.config import GPU_EXECUTION
from tinysam.modeling.image_encoder import set_attention_impl
from tinysam.sample_data import sample_images, write_sample_corpus
from tinysam.transforms import prepare_image, to_rgb_uint8
from tinysam.utils.metrics import best_match_ious

RESULTS: Dict[str, Any] = {}
DEVICE = "cuda"
SMOKE = False  # --smoke-cpu: toy sizes on the CPU
OUT_DIR: Any = None
DEADLINE = float("inf")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def save() -> None:
    if OUT_DIR:
        Path(OUT_DIR, "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def section(name: str, fn: Callable[[], Dict[str, Any]], estimate_s: float = 60) -> None:
    """Run one section unless its estimated seconds do not fit before the deadline."""
    if time.monotonic() + estimate_s > DEADLINE:
        RESULTS[name] = {"skipped": f"needs ~{estimate_s:.0f} s, {DEADLINE - time.monotonic():.0f} s left"}
        print(name, RESULTS[name], flush=True)
        save()
        return
    start = time.perf_counter()
    try:
        RESULTS[name] = fn()
    except Exception as exc:  # one broken section must not hide the others' figures
        RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(RESULTS[name]["traceback"], flush=True)
    RESULTS[name]["section_seconds"] = round(time.perf_counter() - start, 1)
    print(name, json.dumps({k: v for k, v in RESULTS[name].items() if k != "traceback"}, default=str), flush=True)
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
    with torch.device(DEVICE):  # random init on the GPU: seconds instead of a minute for SAM-H
        return build_sam(model_type, checkpoint).to(DEVICE).eval()


def encode(model, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        return model.image_encoder(x).float()


def real_batch(n: int) -> torch.Tensor:
    images = [im for _, im in sample_images()] * n
    return torch.stack([prepare_image(im).tensor for im in images[:n]]).to(DEVICE)


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def encoder_speed(model_type: str, checkpoint, batches: List[int], iters: int, fp32_batches=()) -> Dict[str, Any]:
    model = on_gpu(model_type, checkpoint)
    out: Dict[str, Any] = {"checkpoint": "random-init" if checkpoint is None else "real"}
    # explicit: the (heads, q, k) bias built in memory; fused: FlexAttention with the bias as a
    # score_mod (the CUDA default), compiled once per shape (the first, warm-up call)
    for b in batches:
        x = real_batch(b)
        for name, bf16, impl in (
            ("fp32", False, "explicit"),
            ("bf16", True, "explicit"),
            ("bf16_fused", True, "fused"),
        ):
            if name == "fp32" and b not in fp32_batches:
                continue
            set_attention_impl(model, impl)
            reset_peak()
            s = median_seconds(lambda: encode(model, x, bf16), iters)
            out[f"b{b}_{name}_images_per_s"] = round(b / s, 2)
            out[f"b{b}_{name}_peak_gib"] = peak_gib()
        if b in fp32_batches:
            out[f"b{b}_bf16_speedup"] = round(out[f"b{b}_bf16_images_per_s"] / out[f"b{b}_fp32_images_per_s"], 2)
        out[f"b{b}_fused_speedup"] = round(out[f"b{b}_bf16_fused_images_per_s"] / out[f"b{b}_bf16_images_per_s"], 2)
    x = real_batch(2)
    set_attention_impl(model, "explicit")
    ref, low = encode(model, x, False), encode(model, x, True)
    set_attention_impl(model, "fused")
    fused = encode(model, x, True)
    out["bf16_rel_error"] = float((low - ref).norm() / ref.norm())
    out["bf16_fused_vs_explicit_rel_error"] = float((fused - low).norm() / low.norm())
    return out


def compiled_encoder_speed(batches: List[int], iters: int) -> Dict[str, Any]:
    """SAM-H in bf16 with fused attention, eager vs compiled by Inductor (what the precompute job's
    --compile does), and the compile's cost: the first call at each batch size."""
    model = on_gpu("vit_h", None)
    set_attention_impl(model, "fused")
    out: Dict[str, Any] = {}
    for b in batches:
        x = real_batch(b)
        out[f"b{b}_eager_images_per_s"] = round(b / median_seconds(lambda: encode(model, x, True), iters), 2)
    eager = model.image_encoder
    model.image_encoder = torch.compile(eager)
    for b in batches:
        x = real_batch(b)
        start = time.perf_counter()
        encode(model, x, True)
        sync()
        out[f"b{b}_compile_seconds"] = round(time.perf_counter() - start, 1)
        out[f"b{b}_compiled_images_per_s"] = round(b / median_seconds(lambda: encode(model, x, True), iters), 2)
        out[f"b{b}_compile_speedup"] = round(out[f"b{b}_compiled_images_per_s"] / out[f"b{b}_eager_images_per_s"], 2)
    x = real_batch(batches[0])
    compiled = encode(model, x, True)
    model.image_encoder = eager
    reference = encode(model, x, True)
    out["compiled_vs_eager_rel_error"] = float((compiled - reference).norm() / reference.norm())
    return out


def flex_compile_probe(batches=(1, 3, 5, 7, 9)) -> Dict[str, Any]:
    """SAM-H's fused attention compiled with static shapes (a compile per batch size, and eager
    fallback once dynamo's recompile limit is hit) vs dynamic shapes: speed at batch 16, then
    the seconds per image of each new (ragged) batch size in turn, first call included."""
    import tinysam.modeling.image_encoder as image_encoder

    model = on_gpu("vit_h", None)
    set_attention_impl(model, "fused")
    out: Dict[str, Any] = {}
    x16 = real_batch(16)
    for dynamic in (False, True):
        torch._dynamo.reset()
        image_encoder._flex_attention, image_encoder.FLEX_COMPILE_DYNAMIC = None, dynamic
        start = time.perf_counter()
        encode(model, x16, True)
        sync()
        out[f"dynamic_{dynamic}_first_call_s"] = round(time.perf_counter() - start, 1)
        out[f"dynamic_{dynamic}_b16_images_per_s"] = round(16 / median_seconds(lambda: encode(model, x16, True), 5), 2)
        ragged = {}
        for b in batches:
            x = real_batch(b)
            start = time.perf_counter()
            encode(model, x, True)
            sync()
            first = time.perf_counter() - start
            ragged[b] = [round(first, 2), round(b / median_seconds(lambda: encode(model, x, True), 2, warmup=0), 2)]
        out[f"dynamic_{dynamic}_ragged_first_s_then_images_per_s"] = ragged
    x = real_batch(3)
    fused = encode(model, x, True)
    set_attention_impl(model, "explicit")
    ref = encode(model, x, True)
    out["dynamic_True_vs_explicit_rel_error"] = float((fused - ref).norm() / ref.norm())
    torch._dynamo.reset()
    image_encoder._flex_attention, image_encoder.FLEX_COMPILE_DYNAMIC = None, False
    return out


EVERYTHING_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def prepared_photos(names=EVERYTHING_PHOTOS):
    images = [to_rgb_uint8(im, name) for name, im in sample_images(names)]
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


def everything_on_gpu(checkpoint: str) -> Dict[str, Any]:
    """Per-image time of dense and hierarchical everything mode on the GPU (the stored defaults),
    the bfloat16 decoder against float32, and the GPU's masks against the CPU's."""
    model = on_gpu("vit_t", checkpoint)
    images, prepared = prepared_photos(EVERYTHING_PHOTOS[: 1 if SMOKE else 4])
    with torch.inference_mode():
        embs = [encode(model, p.tensor[None].to(DEVICE), False) for p in prepared]
    out: Dict[str, Any] = {}
    gens = {
        "dense": make_generator(model, EverythingConfig("dense", points_per_side=32)),
        "hierarchical": make_generator(model, EverythingConfig()),
        "hierarchical_bf16_decoder": make_generator(model, EverythingConfig(decoder_dtype="bfloat16")),
    }
    masks: Dict[str, List] = {}
    for name, gen in gens.items():
        timed_generate(gen, embs[0], prepared[:1], images[:1])  # warm-up
        runs = [timed_generate(gen, e, [p], [im]) for e, p, im in zip(embs, prepared, images)]
        masks[name] = [m[0] for m, _ in runs]
        out[f"{name}_seconds_per_image"] = round(statistics.median(t for _, t in runs), 3)
    bf16 = [agreement(a, b) for a, b in zip(masks["hierarchical"], masks["hierarchical_bf16_decoder"])]
    out["decoder_bf16_vs_fp32_min_best_iou"] = min(a["min_best_iou"] or 1.0 for a in bf16)
    out["decoder_bf16_vs_fp32_mean_best_iou"] = round(float(np.mean([a["mean_best_iou"] or 1.0 for a in bf16])), 4)
    # The same generators on the CPU, same weights and embeddings: the GPU's masks must match.
    cpu_model = build_sam("vit_t", checkpoint).eval()
    for name, n_images in (("dense", 1), ("hierarchical", 1 if SMOKE else 3)):
        cpu_gen = make_generator(
            cpu_model, EverythingConfig("dense", points_per_side=32) if name == "dense" else EverythingConfig()
        )
        rows = []
        for e, p, im, gpu_masks in list(zip(embs, prepared, images, masks[name]))[:n_images]:
            cpu_masks, _ = timed_generate(cpu_gen, e.cpu(), [p], [im])
            rows.append(agreement(cpu_masks[0], gpu_masks))
        out[f"{name}_gpu_vs_cpu"] = rows
        out[f"{name}_gpu_vs_cpu_min_best_iou"] = min(r["min_best_iou"] or 1.0 for r in rows)
    return out


GPU_SETTINGS = (  # (points_per_batch, decoder_chunk, upsample_chunk): the CPU defaults of 2026-11-30 first
    (64, 4, 16),
    (64, 64, 16),
    (64, 64, 64),
    (256, 256, 64),
    (1024, 1024, 64),
)


def everything_settings(checkpoint: str, images_per_call=(1, 4)) -> Dict[str, Any]:
    """Hierarchical everything mode (the default rule) on the GPU for each (points_per_batch,
    decoder_chunk, upsample_chunk): seconds per image, GPU busy, and the masks against the CPU
    defaults' (the same rule, so the same masks up to float rounding). Images one per call and
    four per call (the job's batch)."""
    model = on_gpu("vit_t", checkpoint)
    images, prepared = prepared_photos()
    if SMOKE:
        images, prepared = images[:2], prepared[:2]
    with torch.inference_mode():
        embs = encode(model, torch.stack([p.tensor for p in prepared]).to(DEVICE), False)
    out: Dict[str, Any] = {}
    reference = None
    best = None
    for ppb, chunk, up in GPU_SETTINGS[:2] if SMOKE else GPU_SETTINGS:
        gen = make_generator(model, EverythingConfig(points_per_batch=ppb, decoder_chunk=chunk, upsample_chunk=up))
        for n in images_per_call:
            timed_generate(gen, embs[:n], prepared[:n], images[:n])  # warm-up
            masks, seconds = [], 0.0
            with GpuSampler() as gpu:
                for i in range(0, len(images), n):
                    m, t = timed_generate(gen, embs[i : i + n], prepared[i : i + n], images[i : i + n])
                    masks += m
                    seconds += t
            if reference is None:
                reference = masks
            agree = [agreement(a, b) for a, b in zip(reference, masks)]
            key = f"ppb{ppb}_chunk{chunk}_up{up}_n{n}"
            out[key] = {
                "seconds_per_image": round(seconds / len(images), 3),
                "min_best_iou_vs_cpu_defaults": min(a["min_best_iou"] or 1.0 for a in agree),
                "masks": sum(len(m) for m in masks),
                **gpu.summary(),
            }
            if out[key]["min_best_iou_vs_cpu_defaults"] >= 0.99 and (
                best is None or out[key]["seconds_per_image"] < out[best]["seconds_per_image"]
            ):
                best = key
    out["best"] = best
    return out


class GpuSampler:
    """GPU utilisation sampled every 0.2 s while a job runs (NVML)."""

    def __init__(self) -> None:
        self.nvml = None  # a smoke run on the CPU samples nothing
        if DEVICE == "cuda":
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


def precompute_on_gpu(work: Path, images: int, batch_size: int, compile: bool = False) -> Dict[str, Any]:
    folder = write_sample_corpus(work / "teacher_in", images)
    model = on_gpu("vit_h", None)
    set_attention_impl(model, "fused" if DEVICE == "cuda" else "explicit")

    def run_batch(batch):
        x = torch.stack([prepare_image(im).tensor for im in batch]).to(DEVICE)
        return encode(model, x, True).half().cpu().numpy()

    loop = loop_images_per_s(write_sample_corpus(work / "teacher_loop", min(images, 64)), run_batch, batch_size)
    with GpuSampler() as gpu:
        summary = precompute_embeddings(
            str(folder),
            str(work / ("teacher_out_compiled" if compile else "teacher_out")),
            teacher="vit_h",
            checkpoint=None,
            batch_size=batch_size,
            num_gpus_per_actor=1 if DEVICE == "cuda" else 0,
            num_cpus_per_actor=4 if DEVICE == "cuda" else 1,
            compile=compile,
        )
    return {
        "compile": compile,
        "images": images,
        "batch_size": batch_size,
        "loop_images_per_s": round(loop, 2),
        "job_images_per_s_incl_start": round(summary.images_per_second, 2),
        "job_vs_loop": round(summary.images_per_second / loop, 3),
        "job_seconds": round(summary.seconds, 1),
        "job_first_result_seconds": round(summary.first_result_seconds, 1),
        "job_images_per_s_after_first": round(summary.steady_images_per_second, 2),
        "job_after_first_vs_loop": round(summary.steady_images_per_second / loop, 3),
        "written": summary.written,
        "failed": summary.failed,
        **gpu.summary(),
    }


def automask_on_gpu(
    work: Path, checkpoint: str, images: int, batch_size: int, settings: Dict[str, int], pools
) -> Dict[str, Any]:
    """The auto-masking job on one GPU with `settings` for everything mode, for each (actors,
    CPUs per actor) in `pools` (the GPU shared evenly), against a bare loop with one model."""
    folder = write_sample_corpus(work / "automask_in", images)
    everything = EverythingConfig(**settings)
    model = on_gpu("vit_t", checkpoint)
    gen = make_generator(model, everything)

    def run_batch(batch):
        prepared = [prepare_image(im) for im in batch]
        emb = encode(model, torch.stack([p.tensor for p in prepared]).to(DEVICE), False)
        with torch.inference_mode():
            return gen.generate_from_embeddings(emb, [p.input_size for p in prepared], [im.shape[:2] for im in batch])

    loop = loop_images_per_s(folder, run_batch, batch_size)
    out: Dict[str, Any] = {
        "images": images,
        "batch_size": batch_size,
        "settings": settings,
        "loop_images_per_s": round(loop, 2),
        "actor_in_process": actor_in_process(folder, checkpoint, everything, batch_size),
    }
    for actors, cpus in pools:
        if time.monotonic() + 45 > DEADLINE:
            out[f"actors{actors}"] = "skipped: out of time"
            continue
        with GpuSampler() as gpu:
            summary = automask(
                str(folder),
                str(work / f"automask_out_{actors}"),
                model="vit_t",
                checkpoint=checkpoint,
                everything=everything,
                batch_size=batch_size,
                concurrency=actors,
                num_gpus_per_actor=1 / actors if DEVICE == "cuda" else 0,
                num_cpus_per_actor=cpus,
                rows_per_file=16,
            )
        out[f"actors{actors}"] = {
            "cpus_per_actor": cpus,
            "failed": summary.failed,
            "first_errors": first_errors(work / f"automask_out_{actors}") if summary.failed else [],
            "job_images_per_s_incl_start": round(summary.images_per_second, 2),
            "job_vs_loop": round(summary.images_per_second / loop, 3),
            "job_seconds": round(summary.seconds, 1),
            "job_first_result_seconds": round(summary.first_result_seconds, 1),
            "job_images_per_s_after_first": round(summary.steady_images_per_second, 2),
            "encode_s_per_image": round(summary.encode_seconds / max(1, summary.written), 4),
            "generate_s_per_image": round(summary.generate_seconds / max(1, summary.written), 4),
            "masks_per_image": round(summary.masks_per_image, 1),
            "written": summary.written,
            **gpu.summary(),
        }
        print(f"actors{actors}", out[f"actors{actors}"], flush=True)
        if not summary.written:
            break
    return out


def first_errors(output: Path, n: int = 2) -> List[str]:
    from pipelines.storage.errors import read_errors

    return [str(e)[:600] for e in read_errors(str(output)).column("error").to_pylist()[:n]]


def actor_in_process(folder: Path, checkpoint: str, everything: EverythingConfig, n: int) -> Dict[str, Any]:
    """The auto-masking actor's code on one batch in this process (no Ray): its errors, with a
    traceback when it raises."""
    from pipelines.automask.worker import AutoMasker
    from pipelines.reading import prepare_images, read_sources

    try:
        refs = list_images(str(folder))[:n]
        batch = {"image_id": np.array([r.image_id for r in refs]), "source": np.array([r.source for r in refs])}
        batch = prepare_images(read_sources(batch))
        actor = AutoMasker("vit_t", checkpoint, everything)
        result = actor(batch)
        return {"errors": [str(e)[:600] for e in result["error"] if e], "masks": [len(m) for m in result["masks"]]}
    except Exception:
        return {"traceback": traceback.format_exc()[-2000:]}


PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "clock",
    "page",
    "text",
)


def distill_on_gpu(work: Path, checkpoint: str, steps: int, student: str = "vit_t") -> Dict[str, Any]:
    """The whole distillation path on the GPU: pseudo labels by the teacher's everything mode,
    teacher embeddings by the precompute job, then Ray Train (1 GPU worker, bf16 autocast)."""
    from pipelines.distill import DistillJob, distill
    from tinysam.sample_data import write_pseudo_labelled_shard

    names = []
    for name in PHOTOS:  # whichever photos this scikit-image ships
        try:
            [(_, image)] = sample_images((name,))
            to_rgb_uint8(image, name)
            names.append(name)
        except Exception:
            pass
    teacher = on_gpu("vit_t", checkpoint)
    start = time.perf_counter()
    shard = write_pseudo_labelled_shard(work / "sa1b", teacher, tuple(names), points_per_side=16)
    label_s = time.perf_counter() - start
    precompute_embeddings(
        str(shard),
        str(work / "distill_emb"),
        teacher="vit_t",
        checkpoint=checkpoint,
        batch_size=8,
        num_gpus_per_actor=1,
        num_cpus_per_actor=4,
    )
    job = DistillJob(
        embeddings=str(work / "distill_emb"),
        teacher_checkpoint=checkpoint,
        student=student,
        num_workers=1,
        use_gpu=True,
        cpus_per_worker=8,
        batch_size=4,
        steps=steps,
        checkpoint_every=max(1, steps // 5),
        storage_path=str(work / "runs"),
        name="gpu",
        val_fraction=0.2,
        distill={"lr": 2e-3, "warmup_steps": 10},
    )
    summary = distill(job)
    print(summary.table, flush=True)
    return {
        "images": len(names),
        "pseudo_label_seconds": round(label_s, 1),
        "steps": summary.steps,
        "student": student,
        "images_per_s": round(summary.images_per_second, 2),
        "data_wait_fraction": round(summary.data_wait_fraction, 3),
        "loss_start": round(summary.loss_start, 4),
        "loss_end": round(summary.loss_end, 4),
        "miou_start": round(summary.miou_start, 4),
        "miou_end": round(summary.miou_end, 4),
        "table": summary.table,
    }


def main() -> None:
    global DEVICE, SMOKE, OUT_DIR, DEADLINE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    DEADLINE = time.monotonic() + args.budget_s
    OUT_DIR = args.out
    if args.smoke_cpu:
        DEVICE, SMOKE = "cpu", True
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; the CPU figures are in the other benchmarks")
    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (smoke run)"
    RESULTS["env"] = {"gpu": gpu, "torch": torch.__version__}
    print(RESULTS["env"], flush=True)
    work = Path(tempfile.mkdtemp(prefix="tinysam-gpu-"))
    settings = dict(GPU_EXECUTION)

    def teacher_job(compile: bool) -> Dict[str, Any]:
        images, batch = (2, 1) if SMOKE else (args.teacher_images, args.teacher_batch)
        return precompute_on_gpu(work, images, batch, compile=compile)

    try:
        wanted = args.sections.split(",")
        if "encoders" in wanted:
            section(
                "encoder_vit_h",
                lambda: encoder_speed(
                    "vit_h", None, [1] if SMOKE else [8, 16, 32], 1 if SMOKE else 5, [1 if SMOKE else 8]
                ),
                90,
            )
            section(
                "encoder_vit_t",
                lambda: encoder_speed(
                    "vit_t",
                    args.vit_t_checkpoint,
                    [1] if SMOKE else [1, 8, 32],
                    2 if SMOKE else 10,
                    [8],
                ),
                20,
            )
        if "everything" in wanted:
            section("everything_vit_t", lambda: everything_on_gpu(args.vit_t_checkpoint), 60)
        if "settings" in wanted:
            section(
                "everything_settings",
                lambda: everything_settings(args.vit_t_checkpoint, (1, 2) if SMOKE else (1, 4)),
                60,
            )
            best = RESULTS["everything_settings"].get("best")
            if best:
                ppb, chunk, up = (int(v) for v in re.findall(r"\d+", best)[:3])
                settings = {"points_per_batch": ppb, "decoder_chunk": chunk, "upsample_chunk": up}
        if "automask" in wanted:
            init_ray(num_cpus=2 if SMOKE else None)
            pools = [(1, 1)] if SMOKE else [(1, 4), (2, 4), (4, 3)]
            section(
                "automask_job_vit_t",
                lambda: automask_on_gpu(
                    work,
                    args.vit_t_checkpoint,
                    4 if SMOKE else args.automask_images,
                    2 if SMOKE else 4,
                    settings,
                    pools,
                ),
                90,
            )
        if "precompute" in wanted:
            init_ray(num_cpus=2 if SMOKE else None)
            section("precompute_job_vit_h", lambda: teacher_job(False), 70)
        if "distill" in wanted:
            init_ray()
            section("distill_vit_t", lambda: distill_on_gpu(work, args.vit_t_checkpoint, args.distill_steps), 120)
        if "flex" in wanted:
            section("flex_compile_probe", flex_compile_probe, 90)
        if "compile" in wanted:  # late: compiling SAM-H takes minutes
            section(
                "encoder_vit_h_compiled",
                lambda: compiled_encoder_speed([1] if SMOKE else [args.teacher_batch], 1 if SMOKE else 5),
                150,
            )
        if "precompute_compiled" in wanted:
            init_ray(num_cpus=2 if SMOKE else None)
            section("precompute_job_vit_h_compiled", lambda: teacher_job(True), 150)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        save()
    print("\nsummary")
    for name, res in RESULTS.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in res.items() if k != "traceback"))


if __name__ == "__main__":
    main()
