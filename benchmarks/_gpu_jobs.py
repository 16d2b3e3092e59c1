"""gpu_check.py's everything-mode and job sections: the generators on the device, the precompute,
auto-masking and distillation jobs against bare loops."""

import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

import _gpu_run as run  # benchmarks/ is on sys.path
import numpy as np
import torch
from _gpu import (
    EVERYTHING_PHOTOS,
    GpuSampler,
    agreement,
    encode,
    first_errors,
    grid,
    loop_images_per_s,
    on_gpu,
    prepared_photos,
    timed_generate,
)
from _harness import coco_rle_generator, steady_images_per_second

from pipelines.automask import AutomaskOptions, automask
from pipelines.options import CorpusOptions
from pipelines.precompute import PrecomputeOptions, precompute_embeddings
from pipelines.sources import list_images
from tinysam import build_sam
from tinysam.everything import EverythingConfig
from tinysam.modeling.image_encoder import set_attention_impl
from tinysam.transforms import prepare_image, to_rgb_uint8
from tinysam_samples import sample_images, write_sample_corpus


def everything_on_gpu(checkpoint: str) -> Dict[str, Any]:
    """Per-image time of dense and hierarchical everything mode on the GPU (the stored defaults),
    the bfloat16 decoder against float32, and the GPU's masks against the CPU's."""
    model = on_gpu("vit_t", checkpoint)
    images, prepared = prepared_photos(EVERYTHING_PHOTOS[: 1 if run.SMOKE else 4])
    with torch.inference_mode():
        embs = [encode(model, p.tensor[None].to(run.DEVICE), False) for p in prepared]
    out: Dict[str, Any] = {}
    gens = {
        "dense": coco_rle_generator(model, EverythingConfig("dense", points_per_side=grid())),
        "hierarchical": coco_rle_generator(model, EverythingConfig(points_per_side=grid())),
        "hierarchical_bf16_decoder": coco_rle_generator(
            model, EverythingConfig(points_per_side=grid(), decoder_dtype="bfloat16")
        ),
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
    for name, n_images in (("dense", 1), ("hierarchical", 1 if run.SMOKE else 3)):
        cpu_gen = coco_rle_generator(
            cpu_model,
            EverythingConfig("dense", points_per_side=grid())
            if name == "dense"
            else EverythingConfig(points_per_side=grid()),
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
    if run.SMOKE:
        images, prepared = images[:2], prepared[:2]
    with torch.inference_mode():
        embs = encode(model, torch.stack([p.tensor for p in prepared]).to(run.DEVICE), False)
    out: Dict[str, Any] = {}
    reference = None
    best = None
    for ppb, chunk, up in GPU_SETTINGS[:2] if run.SMOKE else GPU_SETTINGS:
        gen = coco_rle_generator(
            model,
            EverythingConfig(points_per_side=grid(), points_per_batch=ppb, decoder_chunk=chunk, upsample_chunk=up),
        )
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


def precompute_on_gpu(work: Path, images: int, batch_size: int, compile: bool = False) -> Dict[str, Any]:
    folder = write_sample_corpus(work / "teacher_in", images)
    model = on_gpu("vit_h", None)
    set_attention_impl(model, "fused" if run.DEVICE == "cuda" else "explicit")

    def run_batch(batch):
        x = torch.stack([prepare_image(im).tensor for im in batch]).to(run.DEVICE)
        return encode(model, x, True).half().cpu().numpy()

    loop = loop_images_per_s(write_sample_corpus(work / "teacher_loop", min(images, 64)), run_batch, batch_size)
    with GpuSampler() as gpu:
        summary = precompute_embeddings(
            PrecomputeOptions(
                CorpusOptions(
                    input=str(folder),
                    output=str(work / ("teacher_out_compiled" if compile else "teacher_out")),
                    batch_size=batch_size,
                    num_gpus_per_actor=1 if run.DEVICE == "cuda" else 0,
                    num_cpus_per_actor=4 if run.DEVICE == "cuda" else 1,
                ),
                teacher="vit_h",
                checkpoint=None,
                compile=compile,
            )
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
        "job_images_per_s_after_first": round(steady_images_per_second(summary), 2),
        "job_after_first_vs_loop": round(steady_images_per_second(summary) / loop, 3),
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
    everything = EverythingConfig(points_per_side=grid(), **settings)
    model = on_gpu("vit_t", checkpoint)
    gen = coco_rle_generator(model, everything)

    def run_batch(batch):
        prepared = [prepare_image(im) for im in batch]
        emb = encode(model, torch.stack([p.tensor for p in prepared]).to(run.DEVICE), False)
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
        if time.monotonic() + 45 > run.DEADLINE:
            out[f"actors{actors}"] = "skipped: out of time"
            continue
        with GpuSampler() as gpu:
            summary = automask(
                AutomaskOptions(
                    CorpusOptions(
                        input=str(folder),
                        output=str(work / f"automask_out_{actors}"),
                        batch_size=batch_size,
                        concurrency=actors,
                        num_gpus_per_actor=1 / actors if run.DEVICE == "cuda" else 0,
                        num_cpus_per_actor=cpus,
                        rows_per_file=16,
                    ),
                    model="vit_t",
                    checkpoint=checkpoint,
                    everything=everything,
                )
            )
        out[f"actors{actors}"] = {
            "cpus_per_actor": cpus,
            "failed": summary.failed,
            "first_errors": first_errors(work / f"automask_out_{actors}") if summary.failed else [],
            "job_images_per_s_incl_start": round(summary.images_per_second, 2),
            "job_vs_loop": round(summary.images_per_second / loop, 3),
            "job_seconds": round(summary.seconds, 1),
            "job_first_result_seconds": round(summary.first_result_seconds, 1),
            "job_images_per_s_after_first": round(steady_images_per_second(summary), 2),
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
    from tinysam_samples import write_pseudo_labelled_shard

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
        PrecomputeOptions(
            CorpusOptions(
                input=str(shard),
                output=str(work / "distill_emb"),
                batch_size=8,
                num_gpus_per_actor=1,
                num_cpus_per_actor=4,
            ),
            teacher="vit_t",
            checkpoint=checkpoint,
        )
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
