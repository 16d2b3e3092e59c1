"""Everything mode against the official generator, with the real MobileSAM weights on real photos."""

import json
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tinysam import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
from tinysam.utils.metrics import best_match_ious

from .helpers import import_official, job_env

pytestmark = pytest.mark.usefixtures("freed_memory_kept")


def _assert_same_masks(ours, official):
    """The same weights, the same settings: every official mask and every mask of ours has its
    twin (IoU >= 0.99, as the auto-masking job's test asks of the job against the generator)."""
    assert abs(len(ours) - len(official)) <= max(1, 0.02 * len(official))
    official_masks, our_masks = [r["segmentation"] for r in official], [r["segmentation"] for r in ours]
    ious = best_match_ious(official_masks, our_masks)
    assert ious.min() >= 0.99, f"{(ious < 0.99).sum()} official masks without a match: {np.sort(ious)[:3]}"
    assert best_match_ious(our_masks, official_masks).min() >= 0.99, "a mask of ours without an official twin"


@pytest.fixture(scope="module")
def official_generator_cls():
    return import_official("mobile_sam").SamAutomaticMaskGenerator


@pytest.mark.parametrize("name", ["astronaut"])
def test_dense_mode_gives_the_official_masks(name, vit_t, official_vit_t, official_generator_cls, photos):
    image = photos[name]
    # 8 x 8 points in two batches of 32 (the batching and the merge across batches run; the
    # official generator takes minutes at its 32 x 32 default on a CI core)
    kwargs = dict(points_per_side=8, points_per_batch=32)
    ours = SamAutomaticMaskGenerator(vit_t, **kwargs).generate(image)
    official = official_generator_cls(official_vit_t, **kwargs).generate(image)
    assert len(official) >= 5
    _assert_same_masks(ours, official)
    # The records carry the official fields with the official conventions.
    by_area = sorted(ours, key=lambda r: r["area"])
    ref_by_area = sorted(official, key=lambda r: r["area"])
    assert set(ours[0]) == set(official[0])
    assert by_area[-1]["bbox"] == ref_by_area[-1]["bbox"]
    assert by_area[-1]["crop_box"] == [0, 0, image.shape[1], image.shape[0]]


def test_crop_layers_and_small_region_removal_match_official(vit_t, official_vit_t, official_generator_cls, photos):
    image = photos["chelsea"]
    kwargs = dict(points_per_side=4, crop_n_layers=1, min_mask_region_area=200)  # 5 crops x 16 points
    ours = SamAutomaticMaskGenerator(vit_t, **kwargs).generate(image)
    official = official_generator_cls(official_vit_t, **kwargs).generate(image)
    _assert_same_masks(ours, official)
    crop_boxes = {tuple(r["crop_box"]) for r in ours}
    assert crop_boxes == {tuple(r["crop_box"]) for r in official} and len(crop_boxes) > 1  # masks from the crops too


def _embed(vit_t, image):
    """(embedding, input size, original size) of one image, for `generate_from_embeddings`."""
    import torch

    from tinysam.transforms import prepare_image

    prepared = prepare_image(image)
    with torch.inference_mode():
        return vit_t.image_encoder(prepared.tensor[None]), prepared.input_size, image.shape[:2]


def test_rle_output_modes_decode_to_the_binary_masks(vit_t, photos):
    image = photos["coffee"][:300, :400]
    emb, input_size, size = _embed(vit_t, image)  # one encoder run for the three modes

    def generate(**kwargs):
        return SamAutomaticMaskGenerator(vit_t, points_per_side=8, **kwargs).generate_from_embeddings(
            emb, [input_size], [size]
        )[0]

    binary, coco, raw = generate(), generate(output_mode="coco_rle"), generate(output_mode="uncompressed_rle")
    assert len(binary) == len(coco) == len(raw) > 0
    for b, c, r in zip(binary, coco, raw):
        assert isinstance(c["segmentation"]["counts"], str)  # JSON-serialisable
        decoded = mask_utils.decode({"size": c["segmentation"]["size"], "counts": c["segmentation"]["counts"].encode()})
        assert decoded.shape == (300, 400) and np.array_equal(decoded.astype(bool), b["segmentation"])
        from_raw = mask_utils.decode(mask_utils.frPyObjects(r["segmentation"], 300, 400))
        assert np.array_equal(from_raw.astype(bool), b["segmentation"])
        assert c["area"] == int(b["segmentation"].sum())


def test_several_images_in_one_call_equal_one_by_one(vit_t, photos):
    """The decoder batches several images' points: the same masks as one image at a time (the
    embeddings computed once: the encoder's batching is a batched convolution)."""
    import torch

    images = [photos["astronaut"], photos["coffee"][:, :500]]
    embedded = [_embed(vit_t, image) for image in images]
    gen = SamAutomaticMaskGenerator(vit_t, points_per_side=8, output_mode="coco_rle")
    together = gen.generate_from_embeddings(
        torch.cat([e for e, _, _ in embedded]), [s for _, s, _ in embedded], [o for _, _, o in embedded]
    )
    for (emb, input_size, size), got in zip(embedded, together):
        [alone] = gen.generate_from_embeddings(emb, [input_size], [size])
        assert len(got) == len(alone) > 0
        assert [r["segmentation"] for r in got] == [r["segmentation"] for r in alone]
        assert np.allclose([r["predicted_iou"] for r in got], [r["predicted_iou"] for r in alone], atol=1e-4)


def test_skip_margin_keeps_points_near_the_edge_of_the_confident_area():
    from tinysam.everything.hierarchical import _covered

    area = np.zeros((100, 100), bool)
    area[20:60, 20:60] = True
    points = np.array([[40.0, 40.0], [22.0, 40.0], [40.0, 58.0], [70.0, 40.0]])  # centre, 2 near edges, outside
    assert _covered(points, area, np.array([0.0, 0.0])).tolist() == [True, True, True, False]  # the paper's rule
    assert _covered(points, area, np.array([4.0, 4.0])).tolist() == [True, False, False, False]
    assert _covered(points, area, np.array([4.0, 0.0])).tolist() == [True, False, True, False]  # x margin only
    edge = np.ones((100, 100), bool)  # beyond the image counts as not covered
    assert _covered(np.array([[1.0, 50.0], [50.0, 50.0]]), edge, np.array([4.0, 4.0])).tolist() == [False, True]


def test_presets_against_dense_mode_both_ways_on_a_photo(vit_t, photos):
    """The default (hierarchical, the balanced preset) and the paper's rule (fast) against dense
    mode at the same 32x32 density on a real photo (dense mode is shown to give the official
    generator's masks above). Both ways: every dense mask found (agreement), and no mask of ours
    without a dense match (what a broken cross-round deduplication would add). The default from at
    most 60% of the points; fast loses a small mark inside the cup here (its points lie in the
    cup's confident area, where the embedding changes), so its bound is looser."""
    from tinysam.everything import EverythingConfig

    emb, input_size, size = _embed(vit_t, photos["coffee"])

    def run(preset):
        gen = EverythingConfig.from_preset(preset).generator(vit_t)
        masks = [r["segmentation"] for r in gen.generate_from_embeddings(emb, [input_size], [size])[0]]
        return masks, getattr(gen, "last_stats", None)

    dense, _ = run("quality")
    assert len(dense) >= 10
    decoded = {}
    # (preset, least agreement, dense masks it may miss (best IoU < 0.5), least IoU of each of its
    # masks with a dense one); measured on coffee: balanced 1.0000, none missed, 1.000; fast 0.9039,
    # the mark (0.039), 0.747
    for preset, least_agreement, may_miss, least_matched in (("balanced", 0.98, 0, 0.9), ("fast", 0.85, 1, 0.5)):
        ours, stats = run(preset)
        found = best_match_ious(dense, ours)  # each dense mask's best match among ours
        matched = best_match_ious(ours, dense)  # each of ours' best match among dense's
        print(
            f"{preset} vs dense on coffee: agreement {found.mean():.4f} (least {found.min():.3f}), ours matched "
            f"{matched.mean():.4f} (least {matched.min():.3f}), {len(ours)} vs {len(dense)} masks, {stats}"
        )
        assert found.mean() >= least_agreement and (found < 0.5).sum() <= may_miss, preset
        assert may_miss or found.min() >= 0.9, preset
        assert matched.min() >= least_matched, preset  # no mask of ours without a dense match
        assert len(ours) <= len(dense) + 1, preset  # no duplicates across the two rounds
        # round 1 takes 64 of the dense grid's 1024 points; round 2 the other 960 unless skipped
        assert stats["round1_points"] == 64 and stats["round2_grid_points"] == 960, stats
        assert stats["decoded_points"] == 64 + stats["round2_points"] == 1024 - stats["skipped_points"], stats
        decoded[preset] = stats["decoded_points"]
    assert decoded["fast"] < decoded["balanced"] <= 0.6 * 1024
    # the paper's rule: 8x8 then 32x32, tau 8.5, no margin or similarity test; it skips most of round 2
    paper = EverythingConfig.from_preset("fast").generator(vit_t)
    assert (paper.high_confidence_thresh, paper.skip_margin, paper.skip_similarity) == (8.5, 0, 0)
    assert decoded["fast"] <= 64 + 960 // 2


def test_low_res_decisions_draw_the_full_resolution_masks(vit_t, photos):
    """Deciding on the 256x256 logits at SA-1B's size (the photo's own embedding, its masks drawn
    at 2250x1500). The oracle is full-resolution mode (the official masks, tested above). With
    every decision but the predicted IoU turned off, both modes hold the same candidates: each
    must be drawn exactly (mask, box, stability score). With the default decisions, the masks
    must be the same both ways (every one matched, none extra)."""
    import torch
    from torchvision.ops import box_iou

    emb, input_size, (h, w) = _embed(vit_t, photos["coffee"])
    size = [(h * 15 // 4, w * 15 // 4)]

    def run(**settings):
        gen = SamHierarchicalMaskGenerator(vit_t, points_per_side=16, output_mode="coco_rle", **settings)
        return gen.generate_from_embeddings(emb, [input_size], size)[0]

    def order(records):
        return sorted(records, key=lambda r: (r["predicted_iou"], r["point_coords"]))

    loose = dict(stability_score_thresh=0.0, box_nms_thresh=1.0)
    full, low = order(run(low_res_decisions=False, **loose)), order(run(low_res_decisions=True, **loose))
    assert len(full) == len(low) > 50
    for a, b in zip(full, low):
        assert a == {**b, "stability_score": pytest.approx(b["stability_score"], abs=1e-6)}

    full, low = run(low_res_decisions=False), run(low_res_decisions=True)
    a, b = ([mask_utils.decode(r["segmentation"]) for r in x] for x in (full, low))
    found, extra = best_match_ious(a, b), best_match_ious(b, a)
    print(
        f"low-res decisions at {size[0]}: {len(b)} vs {len(a)} masks, least IoU {found.min():.4f} / {extra.min():.4f}"
    )
    assert len(a) == len(b) >= 8 and found.min() >= 0.99 and extra.min() >= 0.99
    # what NMS guarantees, on the drawn boxes: no two kept masks overlap above its threshold
    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in low)], dtype=torch.float)
    overlaps = box_iou(xyxy, xyxy).fill_diagonal_(0)
    assert overlaps.max() <= 0.7


def test_skip_similarity_is_low_where_the_embedding_changes():
    import torch

    from tinysam.everything.hierarchical import local_similarity

    embedding = torch.zeros(4, 8, 8)
    embedding[0] = 2.0  # the same direction everywhere...
    embedding[:, 5, 5] = torch.tensor([0.0, 3.0, 0.0, 0.0])  # ...but one cell (y 5, x 5)
    cells = np.array([[1.5, 1.5], [5.5, 5.5], [4.2, 5.9], [2.5, 6.0], [0.0, 7.9]])  # (x, y)
    assert local_similarity(embedding, cells) == pytest.approx([1.0, 0.0, 0.0, 1.0, 1.0])


def test_bfloat16_decoder_keeps_the_masks(vit_t, photos):
    """The bfloat16 option: nearly the float32 masks, and the model's own decoder untouched. At 8x8
    points: on CPUs without native bfloat16 (AVX2-only) every bfloat16 product is emulated."""
    import torch

    emb, input_size, size = _embed(vit_t, photos["astronaut"])

    def masks(**kwargs):
        gen = SamHierarchicalMaskGenerator(vit_t, points_per_side=8, **kwargs)
        return [r["segmentation"] for r in gen.generate_from_embeddings(emb, [input_size], [size])[0]]

    bf16, fp32 = masks(decoder_dtype="bfloat16"), masks()
    assert next(vit_t.mask_decoder.parameters()).dtype == torch.float32
    agreement = best_match_ious(fp32, bf16).mean()
    print(f"bfloat16 decoder vs float32: agreement {agreement:.4f}, {len(bf16)} vs {len(fp32)} masks")
    assert len(fp32) >= 8 and agreement >= 0.95


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_decoder_warns_only_where_the_cpu_has_no_native_bfloat16(vit_t, monkeypatch, native):
    import warnings

    import torch

    from tinysam.everything import generator as generator_module

    monkeypatch.setattr(generator_module, "bfloat16_is_native", lambda device: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder = generator_module.reduced_precision_decoder(vit_t.mask_decoder, torch.bfloat16)
    assert next(decoder.parameters()).dtype == torch.bfloat16
    assert any("slower than float32" in str(w.message) for w in caught) == (not native)


def test_bfloat16_decoder_runs_where_onednn_has_no_bfloat16_kernel(monkeypatch):
    """Without AVX-512 (an AVX2-only EPYC) oneDNN refuses a bfloat16 inner product outright; the
    decoder's linear layers then take the plain matmul instead of failing the job."""
    import torch
    from torch import nn

    from tinysam.modeling import folded_decoder

    real = folded_decoder._FUSED_LINEAR

    def refuses_bfloat16(x, *args):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")
        return real(x, *args)

    monkeypatch.setattr(folded_decoder, "_FUSED_LINEAR", refuses_bfloat16)
    folded_decoder.fused_linear_runs.cache_clear()
    try:
        assert not folded_decoder.fused_linear_runs(torch.bfloat16)
        assert folded_decoder.fused_linear_runs(torch.float32) == (real is not None)
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(64, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
        expected = nn.functional.gelu(x @ w.T + b)
        with torch.inference_mode():
            got = folded_decoder._linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), nn.GELU())
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()
    finally:
        folded_decoder.fused_linear_runs.cache_clear()


def test_hierarchical_mode_with_nothing_skipped_is_dense_mode(vit_t, photos):
    """Both rounds partition the dense grid: with no confident area, the dense generator's masks."""
    image = photos["coffee"]
    dense = SamAutomaticMaskGenerator(vit_t, points_per_side=8, output_mode="coco_rle").generate(image)
    gen = SamHierarchicalMaskGenerator(
        vit_t, points_per_side=8, round1_points_per_side=2, high_confidence_thresh=float("inf"), output_mode="coco_rle"
    )
    hierarchical = gen.generate(image)
    assert gen.last_stats["decoded_points"] == 64 and gen.last_stats["skipped_points"] == 0
    assert sorted(r["segmentation"]["counts"] for r in hierarchical) == sorted(
        r["segmentation"]["counts"] for r in dense
    )
    with pytest.raises(ValueError, match="skip_margin"):
        SamHierarchicalMaskGenerator(vit_t, skip_margin=-1)


def test_crop_layers_need_the_pixels():
    """(Stored embeddings giving the image's masks is tested through the automask job.)"""
    import torch

    from tinysam import build_sam

    gen = SamAutomaticMaskGenerator(build_sam("vit_t_mini"), points_per_side=4, crop_n_layers=1)
    with pytest.raises(ValueError, match="crop layers"):
        gen.generate_from_embeddings(torch.zeros(1, 256, 64, 64), [(768, 1024)], [(600, 800)])


@pytest.mark.parametrize(
    "input_size, original_size", [((1024, 1024), (512, 512)), ((683, 1024), (400, 600)), ((1024, 768), (1500, 1125))]
)
def test_upsampling_matrices_equal_the_two_interpolations(vit_t, input_size, original_size):
    """Everything mode's separable upsampling against Sam.postprocess_masks (bilinear, crop, bilinear)."""
    import torch

    from tinysam.everything.amg import upsample_logits

    logits = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 10
    expected = vit_t.postprocess_masks(logits[:, None], input_size, original_size)[:, 0]
    got = upsample_logits(logits, input_size, original_size, vit_t.image_encoder.img_size)
    assert got.shape == (3, *original_size)
    assert (got - expected).abs().max().item() <= 1e-4


def test_everything_config_from_the_cli_to_the_generator(vit_t):
    """The typed settings: the auto-masking job's flags build the config, the config builds the
    generator (its grid has points_per_side squared points), bad settings are refused by name, and
    the stored JSON reads back to the same config."""
    import argparse
    import dataclasses

    from pipelines.cli import add_everything_arguments, everything_config
    from tinysam.everything import EverythingConfig, SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator

    p = argparse.ArgumentParser()
    add_everything_arguments(p)
    flags = {a.dest.removeprefix("everything_") for a in p._actions if a.dest.startswith("everything_")}
    assert flags - {"preset"} == {f.name for f in dataclasses.fields(EverythingConfig)}  # a flag per setting
    config = everything_config(p.parse_args(["--mode", "dense", "--points-per-side", "12", "--fast-decoder", "no"]))
    assert config == EverythingConfig("dense", points_per_side=12, fast_decoder=False)
    generator = config.generator(vit_t)
    assert type(generator) is SamAutomaticMaskGenerator and len(generator.point_grids[0]) == 144
    hierarchical = everything_config(p.parse_args(["--points-per-side", "16", "--skip-margin", "0"])).generator(vit_t)
    assert type(hierarchical) is SamHierarchicalMaskGenerator and hierarchical.skip_margin == 0
    assert hierarchical.low_res_decisions and generator.low_res_decisions  # the default, in both modes
    assert not everything_config(p.parse_args(["--low-res-decisions", "no"])).generator(vit_t).low_res_decisions
    assert len(hierarchical.round1_selections[0][0]) == 16  # round 1: a quarter of the density, 4x4
    with pytest.raises(ValueError, match="dense mode has no setting skip_margin"):
        everything_config(p.parse_args(["--mode", "dense", "--skip-margin", "0.5"]))
    with pytest.raises(ValueError, match="box_nms_thresh must be in"):
        EverythingConfig(box_nms_thresh=1.5)
    with pytest.raises(ValueError, match="no setting pointsperside"):
        EverythingConfig.from_dict({"pointsperside": 8})
    assert EverythingConfig.from_dict(json.loads(config.to_json())) == config
    assert EverythingConfig.parse("hierarchical:4:16:9:0.5") == EverythingConfig(
        points_per_side=16, round1_points_per_side=4, high_confidence_thresh=9.0, skip_margin=0.5
    )
    assert EverythingConfig.parse("hierarchical:8:32:4:0.25:0.7").skip_similarity == 0.7
    # presets: named settings that the flags override
    quality = everything_config(p.parse_args(["--preset", "quality"]))
    assert quality == EverythingConfig("dense", low_res_decisions=False)
    assert not quality.generator(vit_t).low_res_decisions  # the official generator's decisions
    assert EverythingConfig.parse("balanced") == EverythingConfig() == everything_config(p.parse_args([]))
    fast = everything_config(p.parse_args(["--preset", "fast", "--skip-margin", "0.5"]))
    assert (fast.high_confidence_thresh, fast.skip_margin, fast.skip_similarity) == (8.5, 0.5, 0.0)
    assert everything_config(p.parse_args(["--preset", "fast", "--mode", "dense"])) == EverythingConfig("dense")
    with pytest.raises(ValueError, match="no everything-mode preset 'slow'"):
        EverythingConfig.from_preset("slow")
    with pytest.raises(ValueError, match="decoder_dtype must be one of"):
        EverythingConfig(decoder_dtype="float16")
    with pytest.raises(SystemExit):  # argparse's own refusal of an unknown preset
        p.parse_args(["--preset", "slow"])
    # GPU actors: the execution settings not given take their GPU values; the masks' settings do not move
    on_gpu = everything_config(p.parse_args(["--decoder-chunk", "32"]), gpu=True)
    assert (on_gpu.points_per_batch, on_gpu.decoder_chunk, on_gpu.upsample_chunk) == (256, 32, 64)
    assert on_gpu.provenance_json() == EverythingConfig().provenance_json() != on_gpu.to_json()
    assert "decoder_chunk" not in on_gpu.provenance_json() and "skip_similarity" in on_gpu.provenance_json()


def test_a_spec_names_any_setting_and_each_config_its_own_name():
    """`--everything` specs (the evaluation job) reach every setting, and two configs whose masks
    can differ never share a name: an evaluation's results are keyed by it."""
    from tinysam.everything import EverythingConfig

    assert EverythingConfig.parse("balanced,low_res_decisions=false") == EverythingConfig(low_res_decisions=False)
    assert EverythingConfig.parse("dense:16, decoder_dtype=bfloat16,pred_iou_thresh=0.8") == EverythingConfig(
        "dense", 16, decoder_dtype="bfloat16", pred_iou_thresh=0.8
    )
    assert EverythingConfig.parse("hierarchical:4:16,round1_points_per_side=2").round1 == 2
    configs = [
        EverythingConfig(),
        EverythingConfig(low_res_decisions=False),
        EverythingConfig.from_preset("quality"),
        EverythingConfig("dense"),
        EverythingConfig(decoder_dtype="bfloat16"),
        EverythingConfig(stability_score_thresh=0.9),
        EverythingConfig.from_preset("fast"),
    ]
    names = [c.name for c in configs]
    assert len(set(names)) == len(names), names
    assert EverythingConfig(decoder_chunk=4).name == EverythingConfig().name  # execution only: same masks
    for spec, error in (
        ("balanced,nosuch=1", "no setting nosuch"),
        ("balanced,low_res_decisions=maybe", "low_res_decisions='maybe' is not a bool"),
        ("balanced,low_res_decisions", "is not name=value"),
        ("dense:8,skip_margin=0.5", "dense mode has no setting skip_margin"),
        ("sparse:8,low_res_decisions=false", "expected a preset"),
    ):
        with pytest.raises(ValueError, match=error):
            EverythingConfig.parse(spec)


def test_full_resolution_paths_give_the_same_records(vit_t, photos, monkeypatch):
    """The full-resolution filters three ways give the same records: per mask window (the CPU
    default), on chunks of whole masks (an accelerator's way) with pycocotools' RLEs, and chunks
    with the RLEs run-length coded on the device path (as on a GPU; forced here on CPU tensors).
    Hierarchical mode on a real photo (its confident area steers round 2), and a crop layer (masks
    placed in the full image)."""

    import torch

    from tinysam.everything import generator as generator_module

    image = photos["coffee"]
    configs = [dict(points_per_side=8), dict(points_per_side=4, crop_n_layers=1)]
    # The three ways differ after the encoder and encode the same image and crops: encode each
    # input once (the repeats were half of this test on a CI core).
    encoder, encoded = vit_t.image_encoder, []

    def encode_once(pixels):
        for seen, embedding in encoded:
            if seen.shape == pixels.shape and torch.equal(seen, pixels):
                return embedding
        encoded.append((pixels, type(encoder).forward(encoder, pixels)))
        return encoded[-1][1]

    monkeypatch.setattr(encoder, "forward", encode_once)

    def run(windowed):
        monkeypatch.setattr(generator_module, "filters_per_window", lambda device: windowed)
        return [SamHierarchicalMaskGenerator(vit_t, output_mode="coco_rle", **c).generate(image) for c in configs]

    windowed, chunks = run(True), run(False)
    monkeypatch.setattr(generator_module, "_encode_rles", generator_module._encode_rles_where_they_are)
    device_rle = run(False)
    assert len(windowed[0]) > 3 and len(windowed[1]) > 3
    for win, chunk, device in zip(windowed, chunks, device_rle):
        assert [r["segmentation"] for r in device] == [r["segmentation"] for r in chunk]
        # the two upsamplings sum in another order: a logit within ~1e-5 of 0 may flip
        assert [r["point_coords"] for r in win] == [r["point_coords"] for r in chunk]
        assert [r["predicted_iou"] for r in win] == [r["predicted_iou"] for r in chunk]
        assert np.allclose([r["stability_score"] for r in win], [r["stability_score"] for r in chunk], atol=1e-4)
        assert np.abs(np.array([r["bbox"] for r in win]) - [r["bbox"] for r in chunk]).max() <= 1
        masks = [[mask_utils.decode(_rle(r)) for r in recs] for recs in (win, chunk)]
        assert best_match_ious(masks[1], masks[0]).min() >= 0.999


def _rle(record):
    seg = record["segmentation"]
    return {"size": seg["size"], "counts": seg["counts"].encode("ascii")}


def test_a_mask_window_holds_every_pixel_above_its_threshold(vit_t):
    """`upsample_window`: inside the window the logits equal the whole-image upsampling; outside
    it every pixel is at most the threshold the window was cut at, for objects anywhere (edges and
    corners included), on an image larger and one smaller than the model's input."""
    import torch

    from tinysam.everything.amg import low_res_spans, upsample_logits, upsample_window, upsampling_reads

    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    centres = [(128, 100), (0, 0), (170, 191), (40, 150)]  # inside both inputs' valid low-res area
    logits = torch.stack([20 - ((yy - y) ** 2 + (xx - x) ** 2).sqrt() for y, x in centres])
    logits += torch.randn(logits.shape, generator=gen)
    threshold = -1.01
    for input_size, original_size in (((683, 1024), (1500, 2250)), ((1024, 768), (400, 300))):
        full = upsample_logits(logits, input_size, original_size, vit_t.image_encoder.img_size)
        rows, cols = upsampling_reads(256, vit_t.image_encoder.img_size, input_size, original_size)
        for k, (r0, r1, c0, c1) in enumerate(low_res_spans(logits > threshold).tolist()):
            window, top, left = upsample_window(logits[k], rows, cols, (r0, r1), (c0, c1))
            h, w = window.shape
            assert 0 < h * w < full[k].numel()
            assert (window - full[k, top : top + h, left : left + w]).abs().max().item() <= 1e-4
            outside = full[k].clone()
            outside[top : top + h, left : left + w] = -1e9
            assert outside.max().item() <= threshold


# One call of the jobs' everything mode on a 24 Mpx photo (6000x4000, a phone's), in a fresh
# process: its peak RSS above the process before the call (which already holds the photo).
PEAK_PROBE = """
import json, sys
import numpy as np, torch
from PIL import Image
from tinysam import build_sam
from tinysam.everything import EverythingConfig
from tinysam.utils.malloc import keep_freed_memory
from tinysam.utils.rss import peak_rss_bytes, reset_peak_rss, rss_bytes
from tinysam_samples import sample_images

keep_freed_memory()  # as the jobs' actors run
torch.set_num_threads(1)
config = EverythingConfig(points_per_side=4, low_res_decisions=sys.argv[1] == "low-res")
gen = config.generator(build_sam("vit_t", "mobile_sam"), output_mode="coco_rle")
image = np.array(Image.fromarray(sample_images(("astronaut",))[0][1]).resize((6000, 4000)))
with torch.inference_mode():
    gen.generate(image[:64, :64])  # the model's own warm-up allocations, outside the measurement
    before = rss_bytes()
    reset_peak_rss()
    masks = gen.generate(image)
print(json.dumps({"masks": len(masks), "extra_mib": (peak_rss_bytes() - before) / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("decisions", ["low-res", "full-resolution"])
def test_a_24_mpx_photo_needs_memory_for_its_kept_masks_only(decisions):
    """Full-resolution work holds one mask's window at a time, whichever way the masks are
    decided: the peak grows with the photo and its largest kept mask, not with the candidates.
    Each candidate's full-resolution logits take ~90 MiB here; upsampling them all at once
    peaked at 7.8 GiB (docs/benchmarks.md). The bound is ~2.2x the 181 MiB measured."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, decisions], capture_output=True, text=True, env=job_env(), check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"24 Mpx, {decisions} decisions: {peak['extra_mib']:.0f} MiB above the process, {peak['masks']} masks")
    assert peak["masks"] >= 3
    assert peak["extra_mib"] <= 400, peak
