"""The GPU path, checked and timed in one run on one card: encoders in fp32 vs bf16 autocast and
explicit vs fused attention (speed, memory, embedding error), everything mode on the GPU (speed,
masks from bf16 vs fp32 embeddings and from the bfloat16 decoder), the two Ray jobs' GPU actor
pools vs a bare loop on the same card (images/s, GPU utilisation), and last SAM-H compiled by
Inductor, alone and in the precompute job (--compile).

    python benchmarks/gpu_check.py [--vit-t-checkpoint mobile_sam] [--out DIR]

Needs a CUDA GPU. SAM-H runs with random weights of the real shapes (its speed does not depend on
the values). Each section reports its own failure and the run goes on; the summary comes last.
"""

import argparse
import json
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
from tinysam.modeling.image_encoder import set_attention_impl
from tinysam.sample_data import sample_images, write_sample_corpus
from tinysam.transforms import prepare_image, to_rgb_uint8
from tinysam.utils.metrics import best_match_ious

RESULTS: Dict[str, Any] = {}


def section(name: str, fn: Callable[[], Dict[str, Any]]) -> None:
    start = time.perf_counter()
    try:
        RESULTS[name] = fn()
    except Exception as exc:  # one broken section must not hide the others' figures
        RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(RESULTS[name]["traceback"], flush=True)
    RESULTS[name]["section_seconds"] = round(time.perf_counter() - start, 1)
    print(name, json.dumps({k: v for k, v in RESULTS[name].items() if k != "traceback"}), flush=True)


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def on_gpu(model_type: str, checkpoint):
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute for SAM-H
        return build_sam(model_type, checkpoint).cuda().eval()


def encode(model, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        return model.image_encoder(x).float()


def real_batch(n: int) -> torch.Tensor:
    images = [im for _, im in sample_images()] * n
    return torch.stack([prepare_image(im).tensor for im in images[:n]]).cuda()


def encoder_speed(model_type: str, checkpoint, batches: List[int], iters: int) -> Dict[str, Any]:
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
            set_attention_impl(model, impl)
            torch.cuda.reset_peak_memory_stats()
            s = median_seconds(lambda: encode(model, x, bf16), iters)
            out[f"b{b}_{name}_images_per_s"] = round(b / s, 2)
            out[f"b{b}_{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out[f"b{b}_bf16_speedup"] = round(out[f"b{b}_bf16_images_per_s"] / out[f"b{b}_fp32_images_per_s"], 2)
        out[f"b{b}_fused_speedup"] = round(out[f"b{b}_bf16_fused_images_per_s"] / out[f"b{b}_bf16_images_per_s"], 2)
    x = real_batch(3)
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
        torch.cuda.synchronize()
        out[f"b{b}_compile_seconds"] = round(time.perf_counter() - start, 1)
        out[f"b{b}_compiled_images_per_s"] = round(b / median_seconds(lambda: encode(model, x, True), iters), 2)
        out[f"b{b}_compile_speedup"] = round(out[f"b{b}_compiled_images_per_s"] / out[f"b{b}_eager_images_per_s"], 2)
    compiled = encode(model, real_batch(2), True)
    model.image_encoder = eager
    reference = encode(model, real_batch(2), True)
    out["compiled_vs_eager_rel_error"] = float((compiled - reference).norm() / reference.norm())
    return out


def everything_on_gpu(checkpoint: str) -> Dict[str, Any]:
    """Per-image time of dense and hierarchical everything mode on the GPU, and whether bf16
    embeddings give the fp32 embeddings' masks."""
    model = on_gpu("vit_t", checkpoint)
    out: Dict[str, Any] = {}
    images = [im for _, im in sample_images(("astronaut", "coffee", "chelsea", "rocket", "camera"))]
    prepared = [prepare_image(im) for im in images]
    for mode in ("dense", "hierarchical"):
        gen = make_generator(model, EverythingConfig(mode, points_per_side=32))
        ious, counts, times = [], [], []
        for im, p in zip(images, prepared):
            x = p.tensor[None].cuda()
            with torch.inference_mode():
                ref = gen.generate_from_embeddings(encode(model, x, False), [p.input_size], [im.shape[:2]])[0]
                torch.cuda.synchronize()
                start = time.perf_counter()
                low = gen.generate_from_embeddings(encode(model, x, True), [p.input_size], [im.shape[:2]])[0]
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            counts.append((len(ref), len(low)))
            ious.extend(best_match_ious(decode(ref), decode(low)))
        out[f"{mode}_seconds_per_image"] = round(statistics.median(times[1:]), 3)
        out[f"{mode}_masks_fp32_vs_bf16"] = counts
        out[f"{mode}_bf16_vs_fp32_mean_best_iou"] = round(float(np.mean(ious)), 4)
        out[f"{mode}_bf16_vs_fp32_min_best_iou"] = round(float(np.min(ious)), 4)
    # The bfloat16 decoder option against the float32 decoder (same fp32 embeddings).
    gens = {dtype: make_generator(model, EverythingConfig(decoder_dtype=dtype)) for dtype in ("float32", "bfloat16")}
    ious, times = [], {dtype: [] for dtype in gens}
    for im, p in zip(images, prepared):
        with torch.inference_mode():
            emb = encode(model, p.tensor[None].cuda(), False)
            masks = {}
            for dtype, gen in gens.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                masks[dtype] = gen.generate_from_embeddings(emb, [p.input_size], [im.shape[:2]])[0]
                torch.cuda.synchronize()
                times[dtype].append(time.perf_counter() - start)
        ious.extend(best_match_ious(decode(masks["float32"]), decode(masks["bfloat16"])))
    for dtype in gens:
        out[f"hierarchical_decoder_{dtype}_seconds_per_image"] = round(statistics.median(times[dtype][1:]), 3)
    out["decoder_bf16_vs_fp32_mean_best_iou"] = round(float(np.mean(ious)), 4)
    # The same generator on the CPU, same weights and fp32 embeddings: the GPU path's masks must match.
    cpu_model = build_sam("vit_t", checkpoint).eval()
    gen_gpu = make_generator(model, EverythingConfig("dense", points_per_side=32))
    gen_cpu = make_generator(cpu_model, EverythingConfig("dense", points_per_side=32))
    with torch.inference_mode():
        emb = encode(model, prepared[0].tensor[None].cuda(), False)
        gpu = gen_gpu.generate_from_embeddings(emb, [prepared[0].input_size], [images[0].shape[:2]])[0]
        cpu = gen_cpu.generate_from_embeddings(emb.cpu(), [prepared[0].input_size], [images[0].shape[:2]])[0]
    ious = best_match_ious(decode(cpu), decode(gpu))
    out["dense_gpu_vs_cpu_masks"] = [len(cpu), len(gpu)]
    out["dense_gpu_vs_cpu_min_best_iou"] = round(float(np.min(ious)), 4) if len(ious) else None
    return out


def decode(records: List[dict]) -> List[np.ndarray]:
    from pycocotools import mask as mask_utils

    return [mask_utils.decode(r["segmentation"]) for r in records]


class GpuSampler:
    """GPU utilisation sampled every 0.2 s while a job runs (NVML)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: List[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.2):
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
    run_batch([to_rgb_uint8(decode_image(read_bytes(refs[0].source)[0], "warm"), "warm")])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(refs), batch_size):
        run_batch(
            [to_rgb_uint8(decode_image(read_bytes(r.source)[0], r.source), r.source) for r in refs[i : i + batch_size]]
        )
    torch.cuda.synchronize()
    return len(refs) / (time.perf_counter() - start)


def precompute_on_gpu(work: Path, images: int, batch_size: int, compile: bool = False) -> Dict[str, Any]:
    folder = write_sample_corpus(work / "teacher_in", images)
    model = on_gpu("vit_h", None)

    def run_batch(batch):
        x = torch.stack([prepare_image(im).tensor for im in batch]).cuda()
        return encode(model, x, True).half().cpu().numpy()

    loop = loop_images_per_s(write_sample_corpus(work / "teacher_loop", min(images, 64)), run_batch, batch_size)
    with GpuSampler() as gpu:
        summary = precompute_embeddings(
            str(folder),
            str(work / ("teacher_out_compiled" if compile else "teacher_out")),
            teacher="vit_h",
            checkpoint=None,
            batch_size=batch_size,
            num_gpus_per_actor=1,
            num_cpus_per_actor=4,
            compile=compile,
        )
    return {
        "compile": compile,
        "images": images,
        "batch_size": batch_size,
        "loop_images_per_s": round(loop, 2),
        "job_images_per_s_incl_start": round(summary.images_per_second, 2),
        "job_seconds": round(summary.seconds, 1),
        "written": summary.written,
        "failed": summary.failed,
        **gpu.summary(),
    }


def automask_on_gpu(work: Path, checkpoint: str, images: int, batch_size: int) -> Dict[str, Any]:
    folder = write_sample_corpus(work / "automask_in", images)
    model = on_gpu("vit_t", checkpoint)
    gen = make_generator(model, EverythingConfig("hierarchical", points_per_side=32))

    def run_batch(batch):
        prepared = [prepare_image(im) for im in batch]
        emb = encode(model, torch.stack([p.tensor for p in prepared]).cuda(), True)
        with torch.inference_mode():
            return gen.generate_from_embeddings(emb, [p.input_size for p in prepared], [im.shape[:2] for im in batch])

    loop = loop_images_per_s(folder, run_batch, batch_size)
    with GpuSampler() as gpu:
        summary = automask(
            str(folder),
            str(work / "automask_out"),
            model="vit_t",
            checkpoint=checkpoint,
            everything=EverythingConfig(points_per_side=32),
            batch_size=batch_size,
            num_gpus_per_actor=1,
            num_cpus_per_actor=4,
        )
    return {
        "images": images,
        "batch_size": batch_size,
        "loop_images_per_s": round(loop, 2),
        "job_images_per_s_incl_start": round(summary.images_per_second, 2),
        "job_seconds": round(summary.seconds, 1),
        "masks_per_image": round(summary.masks_per_image, 1),
        "written": summary.written,
        **gpu.summary(),
    }


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-t-checkpoint", default="mobile_sam")
    parser.add_argument("--teacher-images", type=int, default=512)
    parser.add_argument("--automask-images", type=int, default=48)
    parser.add_argument("--out", default=None, help="folder for gpu_check.json")
    parser.add_argument("--sections", default="encoders,everything,precompute,automask,distill,compile")
    parser.add_argument("--distill-steps", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; the CPU figures are in the other benchmarks")
    RESULTS["env"] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(RESULTS["env"], flush=True)
    work = Path(tempfile.mkdtemp(prefix="tinysam-gpu-"))
    try:
        wanted = args.sections.split(",")
        if "encoders" in wanted:
            section("encoder_vit_t", lambda: encoder_speed("vit_t", args.vit_t_checkpoint, [1, 8, 32], 10))
            section("encoder_vit_h", lambda: encoder_speed("vit_h", None, [1, 8, 16, 32], 5))
        if "everything" in wanted:
            section("everything_vit_t", lambda: everything_on_gpu(args.vit_t_checkpoint))
        if "precompute" in wanted:
            init_ray()
            section("precompute_job_vit_h", lambda: precompute_on_gpu(work, args.teacher_images, 8))
        if "automask" in wanted:
            init_ray()
            section("automask_job_vit_t", lambda: automask_on_gpu(work, args.vit_t_checkpoint, args.automask_images, 4))
        if "distill" in wanted:
            init_ray()
            section("distill_vit_t", lambda: distill_on_gpu(work, args.vit_t_checkpoint, args.distill_steps))
        if "compile" in wanted:  # last: compiling SAM-H takes minutes
            section("encoder_vit_h_compiled", lambda: compiled_encoder_speed([8, 16, 32], 5))
            init_ray()
            section(
                "precompute_job_vit_h_compiled", lambda: precompute_on_gpu(work, args.teacher_images, 8, compile=True)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.out:
            Path(args.out, "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    print("\nsummary")
    for name, res in RESULTS.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in res.items() if k != "traceback"))


if __name__ == "__main__":
    main()
