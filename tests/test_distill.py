"""Distillation: the loss terms, hard prompt sampling and hard mask weighting on real data, the
exported checkpoint in the official code, each split's rows. The Ray Train job itself (2 CPU
workers, checkpoints on S3, a lost worker node, --resume): test_lost_node.py, where one run
serves both (a Ray Train job costs minutes on a CI core)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinysam import build_sam
from tinysam.distill import (
    DistillConfig,
    Distiller,
    HardPromptSampler,
    LossWeights,
    PromptConfig,
    hard_mask_weights,
    init_student_decoder,
    label_masks,
)
from tinysam.distill.data import annotation_list
from tinysam.distill.distiller import match_embedding_statistics
from tinysam_samples import SAMPLE_PHOTOS, write_pseudo_labelled_shard

from .helpers import distill_args, import_official, load_job

PROMPTS = PromptConfig(prompts_per_image=8, max_iterations=3)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, vit_t):
    """SA-1B style shard of 3 real photos labelled by the real vit_t's everything mode (the job
    holds one out: one training image per worker)."""
    return write_pseudo_labelled_shard(tmp_path_factory.mktemp("sa1b"), vit_t, SAMPLE_PHOTOS[:3], points_per_side=8)


@pytest.fixture(scope="module")
def prepared(shard):
    """The shard through the jobs' preprocessing, with the real vit_t's embeddings (as stored by
    the precompute job)."""
    from pipelines.reading import prepare_images, read_shards
    from pipelines.storage.files import DoneIds
    from tinysam.transforms import normalize_and_pad

    [read] = read_shards({"shard": np.array([str(shard)])}, output=str(shard.parent / "out"), done=DoneIds.of([]))
    batch = prepare_images(read)
    teacher = build_sam("vit_t", "mobile_sam")
    with torch.no_grad():
        batch["embedding"] = np.stack(
            [
                teacher.image_encoder(
                    normalize_and_pad(torch.from_numpy(batch["pixels"][i, :h, :w]).permute(2, 0, 1))[None]
                )[0]
                .half()
                .numpy()
                for i, (h, w) in enumerate(zip(batch["input_h"], batch["input_w"]))
            ]
        )
    return batch


@pytest.fixture(scope="module")
def rows(prepared):
    """Training rows as the Ray Data stage makes them."""
    from pipelines.distill import label_rows

    batch = {k: prepared[k] for k in ("image_id", "source", "source_offset", "source_length", "embedding")}
    batch["annotations"] = prepared["annotations"].astype(object)
    return label_rows(batch, max_masks=32)


def provenance(sha: str) -> dict:
    """What the precompute job records of a vit_t teacher's embeddings."""
    return {"model": "vit_t", "checkpoint_sha256": sha, "dtype": "float16"}


def one(rows, i):
    return {k: v[i : i + 1] for k, v in rows.items()}


def test_labels_are_the_annotations_at_decoder_resolution(rows, shard):
    assert rows["gt"].shape[1:] == (32, 256, 256)
    assert (rows["gt_count"] > 0).all()
    for i in range(len(rows["gt_count"])):
        n = rows["gt_count"][i]
        assert rows["gt"][i, n:].sum() == 0  # padding rows are empty
        h, w = (rows["input_h"][i] + 3) // 4, (rows["input_w"][i] + 3) // 4
        assert rows["gt"][i, :n, h:, :].sum() == 0 and rows["gt"][i, :n, :, w:].sum() == 0  # nothing in the padding
    # A mask covering the whole image becomes the whole input region.
    full = {"annotations": [{"segmentation": {"size": [60, 80], "counts": [0, 4800]}, "area": 4800}]}
    assert label_masks(full, (60, 80), (768, 1024), 4).sum() == 192 * 256
    assert annotation_list(json.dumps(full)) == full["annotations"]


def _squares():
    """Four labels (top half of an 8x8 grid) and, per row, a teacher and a student mask of known IoU."""
    gt = torch.zeros(4, 8, 8, dtype=torch.bool)
    gt[:, :4] = True
    half, miss = torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
    half[:2] = True  # IoU 0.5 with the label
    miss[6:] = True  # IoU 0
    teacher = torch.stack([gt[0], half, gt[0], half])  # IoU 1, 0.5, 1, 0.5
    student = torch.stack([gt[0], gt[0], half, miss])  # IoU 1, 1, 0.5, 0
    return gt, teacher, student


def test_hard_mask_weights_follow_the_formula():
    """H = sigmoid(IoU(teacher, GT) / (IoU(student, GT) + eps) - 1), with teachers that are not the
    label: a weighting that ignored the teacher would give rows 0 and 1 the same weight."""
    gt, teacher, student = _squares()
    h = hard_mask_weights(teacher, student, gt, eps=1e-6)
    expected = torch.sigmoid(torch.tensor([1 / (1 + 1e-6), 0.5 / (1 + 1e-6), 1 / (0.5 + 1e-6), 0.5 / 1e-6]) - 1)
    assert torch.allclose(h, expected)
    assert h[1] < h[0] < h[2] < h[3]  # a good teacher and a wrong student weigh most


@pytest.mark.parametrize("hard", [True, False])
def test_hard_mask_weights_multiply_the_output_loss(hard):
    """The output term is the mean of H_i times each mask's L1 to the teacher's logits (plain mean
    without hard mask weighting)."""
    from tinysam.distill import prompt_losses

    gt, teacher, student = _squares()

    def logits(masks, scale):  # +-scale where the mask is on / off, one scale per row
        return (masks.float() * 2 - 1)[:, None] * torch.tensor(scale)[:, None, None, None]

    s_out = {"masks": logits(student, [1.0, 2.0, 3.0, 4.0]), "iou": torch.ones(4, 1), "tokens": torch.zeros(4, 2, 8)}
    t_out = {"masks": logits(teacher, [2.0, 1.0, 1.0, 2.0]), "iou": torch.ones(4, 1), "tokens": torch.zeros(4, 2, 8)}
    terms = prompt_losses(s_out, t_out, gt, LossWeights(hard_mask_weighting=hard))
    l1 = (s_out["masks"] - t_out["masks"]).abs().flatten(1).mean(1)
    h = hard_mask_weights(teacher, student, gt) if hard else torch.ones(4)
    assert l1.min() > 0 and terms["output"] == pytest.approx(float((h * l1).mean()), rel=1e-5)
    assert terms["hard_weight"] == pytest.approx(float(h.mean()), rel=1e-5)


def test_hard_prompt_sampling_puts_later_points_in_the_error_region(rows, vit_t):
    gt = torch.from_numpy(rows["gt"][0, : rows["gt_count"][0]]).bool()[:8]
    emb = torch.from_numpy(rows["embedding"][:1]).float()
    sampler = HardPromptSampler(PromptConfig(prompts_per_image=8, max_iterations=9))
    from tinysam.distill import decode

    def predict(coords, labels):
        return decode(vit_t, emb, {"coords": coords, "labels": labels})["masks"]

    with torch.no_grad():
        prompts = sampler.points(gt, predict, 4, torch.Generator().manual_seed(0))
    assert prompts["coords"].shape == (8, 5, 2) and prompts["labels"].shape == (8, 5)
    cells = (prompts["coords"] - 2) / 4
    y0, x0 = cells[:, 0, 1].long(), cells[:, 0, 0].long()
    assert gt[torch.arange(8), y0, x0].all() and (prompts["labels"][:, 0] == 1).all()  # first point inside the label
    placed = 0
    for k in range(1, 5):
        # The oracle: the model run again on the first k points; of its outputs, the one closest
        # to the label. Point k must land in that prediction's error.
        with torch.no_grad():
            masks = predict(prompts["coords"][:, :k], prompts["labels"][:, :k]) > 0
        inter = (masks & gt[:, None]).flatten(2).sum(2)
        union = (masks | gt[:, None]).flatten(2).sum(2)
        pred = masks[torch.arange(8), (inter / union.clamp(min=1)).argmax(1)]
        missed, extra = gt & ~pred, pred & ~gt
        y, x = cells[:, k, 1].long(), cells[:, k, 0].long()
        for j in range(8):
            label = int(prompts["labels"][j, k])
            if label == 1:
                assert missed[j, y[j], x[j]], (k, j)  # a positive lands where the label is missed
            elif label == 0:
                assert extra[j, y[j], x[j]], (k, j)  # a negative lands on a false positive
            else:
                assert not (missed[j] | extra[j]).any()  # padding only once exact
            placed += label >= 0
    assert placed > 0
    # Deterministic under a seed.
    again = sampler.points(gt, predict, 4, torch.Generator().manual_seed(0))
    assert torch.equal(again["coords"], prompts["coords"]) and torch.equal(again["labels"], prompts["labels"])


def test_every_loss_term_is_computed_and_finite(rows):
    torch.manual_seed(0)
    teacher = build_sam("vit_t", "mobile_sam")
    student = build_sam("vit_t_mini")
    init_student_decoder(student, teacher)
    distiller = Distiller(student, teacher, DistillConfig(prompts=PROMPTS), total_steps=2)
    before = [p.detach().clone() for p in student.parameters()]
    metrics = distiller.train_step(one(rows, 0))
    for term in ("embedding", "token", "output", "focal", "dice", "iou", "loss"):
        assert np.isfinite(metrics[term]) and metrics[term] > 0, term
    assert torch.sigmoid(torch.tensor(-1.0)) <= metrics["hard_weight"] <= 1.0  # sigmoid(ratio - 1), ratio >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    # A term weighted 0 is off: without the ground-truth and output terms the loss is alpha*emb + beta*tok.
    distiller.config.weights = LossWeights(output=0, focal=0, dice=0, iou=0)
    m = distiller.train_step(one(rows, 1))
    assert m["loss"] == pytest.approx(m["embedding"] + m["token"], rel=1e-5)


def test_no_hard_flags_turn_off_what_they_name(rows, tmp_path):
    """--no-hard-mask-weighting and --no-hard-prompt-sampling reach the training step: every output
    weight 1 and no hard-sampling iterations, where the defaults give weights below 1 and iterations.
    The student is the teacher itself: a fresh student gets every mask wrong, which weighs 1 either way."""
    parse = load_job("distill").parse
    base = distill_args(tmp_path / "emb", "mobile_sam", storage_path=tmp_path / "runs")
    on = DistillConfig.from_dict(parse(base)[0].distill)
    off = DistillConfig.from_dict(parse([*base, "--no-hard-mask-weighting", "--no-hard-prompt-sampling"])[0].distill)
    assert on.weights.hard_mask_weighting and on.hard_prompt_sampling
    assert not off.weights.hard_mask_weighting and not off.hard_prompt_sampling
    teacher = build_sam("vit_t", "mobile_sam")
    metrics = {}
    for name, config in (("on", on), ("off", off)):
        student = build_sam("vit_t", "mobile_sam")
        config.prompts = PROMPTS
        metrics[name] = Distiller(student, teacher, config, total_steps=1).train_step(one(rows, 0), seed=0)
    assert metrics["off"]["hard_weight"] == 1.0 and metrics["off"]["mean_iterations"] == 0
    assert metrics["on"]["hard_weight"] < 1.0 and metrics["on"]["mean_iterations"] > 0


def test_train_only_trains_the_named_part_and_leaves_the_rest_as_it_was(rows, tmp_path):
    """--train-only: the named parameters move; every other parameter and BatchNorm statistic is
    the same after a step and after precise BN (a frozen stage stays in eval mode); a prefix that
    names nothing is refused."""
    parse = load_job("distill").parse
    base = distill_args(tmp_path / "emb", "mobile_sam", storage_path=tmp_path / "runs")
    config = DistillConfig.from_dict(parse([*base, "--train-only", "image_encoder.neck."])[0].distill)
    assert config.train_only == ("image_encoder.neck.",)
    config.prompts = PROMPTS
    teacher = build_sam("vit_t", "mobile_sam")
    torch.manual_seed(0)
    student = build_sam("vit_t_mini")
    init_student_decoder(student, teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(student, teacher, config, total_steps=2)
    distiller.train_step(one(rows, 0))
    distiller.recompute_bn_statistics(one(rows, 1))
    after = student.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("image_encoder.neck.") for k in moved), sorted(moved)[:5]
    assert any(k.startswith("image_encoder.layers.0.") and "running_mean" in k for k in before)  # BN is there
    config.train_only = ("image_encoder.no_such_layer.",)
    with pytest.raises(ValueError, match="names no parameter"):
        Distiller(build_sam("vit_t_mini"), teacher, config, total_steps=1)


def test_training_lowers_the_loss_on_a_fixed_batch(rows):
    """The loss falls: the same image and the same prompt seed at every step, so the losses differ
    only by what the updates changed (across different images, a few steps' losses are noise)."""
    torch.manual_seed(0)
    teacher = build_sam("vit_t", "mobile_sam")
    student = build_sam("vit_t_mini")
    init_student_decoder(student, teacher)
    match_embedding_statistics(student, torch.from_numpy(rows["embedding"][:1]).float())
    distiller = Distiller(student, teacher, DistillConfig(prompts=PROMPTS), total_steps=4)
    losses = [distiller.train_step(one(rows, 0), seed=0) for _ in range(4)]
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"]  # 2.50 -> 1.26 when written


def test_held_out_loss_falls_in_a_few_steps(rows):
    """A student from scratch, a few steps on two real photos with the encoder's distillation terms
    (embedding and token losses): on the third photo, held out, its embedding moves towards the
    teacher's (L1, after the job's precise BN; 0.078 -> 0.065 in 12 steps when written, falling
    from the third step on). Its mask mIoU against the teacher is printed, not asserted: over a few
    steps it moves by noise (the job reports it at every checkpoint; longer runs:
    benchmarks/distill.py --curve)."""
    torch.manual_seed(0)
    teacher = build_sam("vit_t", "mobile_sam")
    student = build_sam("vit_t_mini")
    init_student_decoder(student, teacher)
    match_embedding_statistics(student, torch.from_numpy(rows["embedding"][:1]).float())
    weights = LossWeights(output=0, focal=0, dice=0, iou=0)
    config = DistillConfig(lr=5e-3, warmup_steps=2, prompts=PROMPTS, weights=weights)
    distiller = Distiller(student, teacher, config, total_steps=STEPS_TO_LEARN)
    train, test = [one(rows, 0), one(rows, 1)], one(rows, 2)

    def held_out() -> tuple:
        distiller.recompute_bn_statistics(train[0])
        student.eval()
        with torch.no_grad():
            images, teacher_embedding, _ = distiller._inputs(test)
            loss = float((student.image_encoder(images) - teacher_embedding).abs().mean())
        student.train()
        return loss, distiller.evaluate([test])["miou_vs_teacher"]

    (loss_before, miou_before) = held_out()
    for step in range(STEPS_TO_LEARN):
        distiller.train_step(train[step % 2])
    (loss_after, miou_after) = held_out()
    print(
        f"held-out embedding L1 {loss_before:.4f} -> {loss_after:.4f}, mIoU(student, teacher) "
        f"{miou_before:.3f} -> {miou_after:.3f}, in {STEPS_TO_LEARN} steps"
    )
    assert loss_after < 0.95 * loss_before


STEPS_TO_LEARN = 9


def test_exported_student_loads_strictly_in_the_official_code(tmp_path):
    from pipelines.distill import export_student

    student = build_sam("vit_t")
    path = export_student(student, str(tmp_path / "student.pth"))
    state = torch.load(path, weights_only=True)
    assert len(state) == 439
    official = import_official("mobile_sam").sam_model_registry["vit_t"]()
    official.load_state_dict(state, strict=True)
    build_sam("vit_t", path)  # and our own loader


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGES_OFF = not THP.exists() or "[never]" in THP.read_text()


@pytest.mark.skipif(HUGE_PAGES_OFF, reason="the kernel has transparent huge pages off")
def test_training_workers_allocate_with_huge_pages(monkeypatch):
    """The workers' environment turns on PyTorch's huge-page allocation (unless the caller set it),
    and in this torch it takes effect: a 64 MB buffer freed and made again 20 times (as a training
    step's activations are) faults its pages back in 2 MB at a time, not 4 KB."""
    from pipelines.distill import HUGE_PAGES_ENV, training_worker_env

    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    assert training_worker_env() == {HUGE_PAGES_ENV: "1"}
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    assert training_worker_env() == {HUGE_PAGES_ENV: "0"}
    code = (
        "import resource, torch\nfor _ in range(20): torch.ones(16 << 20)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)"
    )
    faults = {
        value: int(
            subprocess.run(
                [sys.executable, "-c", code],
                env={**os.environ, HUGE_PAGES_ENV: value},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for value in ("0", "1")
    }
    assert faults["1"] < faults["0"] / 4, faults


def test_each_split_reads_only_its_own_rows(prepared, tmp_path, mobile_sam_path, ray_local):
    from pipelines.distill import labelled_split, split_ids
    from pipelines.precompute import write_batch
    from pipelines.storage.files import parquet_files
    from tinysam.weights import sha256_file

    write_batch(dict(prepared), str(tmp_path / "emb"), provenance(sha256_file(mobile_sam_path)))
    files = parquet_files(str(tmp_path / "emb"))
    train, val = split_ids([str(i) for i in prepared["image_id"]], 0.34)
    assert train and val
    for ids in (train, val):
        rows = labelled_split(ids, files, max_masks=8).take_all()
        assert sorted(r["image_id"] for r in rows) == sorted(ids)
        assert all(r["embedding"].shape == (256, 64, 64) and r["gt"].shape == (8, 256, 256) for r in rows)
