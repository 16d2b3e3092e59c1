"""gpu_check.py's encoder sections: SAM-H in fp32 and bf16, fused attention, compiled."""

import time
from typing import Any, Dict, List

import torch
from _gpu import encode, median_seconds, on_gpu, peak_gib, real_batch, reset_peak, sync

from tinysam.modeling.image_encoder import set_attention_impl


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
