"""The teacher audit of the auto-masking job: a deterministic sample by id, masked again by a
teacher, its agreement stored in `<output>/_audit` and summarised; and the agreement measure
itself, against dense masks decoded independently."""

import hashlib
import json

import numpy as np
import pytest

from pipelines.options import CorpusOptions
from pipelines.storage.audit import is_audited
from tinysam.everything import EverythingConfig
from tinysam.utils.metrics import best_match_ious, rle_agreement
from tinysam.utils.rle import mask_to_coco_rle

from .helpers import load_job

EVERYTHING = EverythingConfig(points_per_side=4)  # a few masks per photo: the agreement is what is tested


def sampled(image_id: str, fraction: float) -> bool:
    """The sample's rule, written again from its definition: the id's SHA-256, first 8 bytes."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:16], 16) < fraction * 2**64


def test_the_sample_is_a_fixed_share_of_ids_and_grows_with_the_fraction():
    ids = [f"sa_{n}" for n in range(20000)]
    one, two = ({i for i in ids if is_audited(i, f)} for f in (0.01, 0.02))
    assert one == {i for i in ids if sampled(i, 0.01)}
    assert 140 <= len(one) <= 260 and 320 <= len(two) <= 480  # binomial, > 4 sigma
    assert one < two
    assert not any(is_audited(i, 0.0) for i in ids[:100]) and all(is_audited(i, 1.0) for i in ids[:100])


def _disk(h, w, cy, cx, r):
    y, x = np.ogrid[:h, :w]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r**2


def test_agreement_on_rles_equals_dense_best_ious(rng):
    def rles(masks):  # as the job stores them: COCO RLE with str counts
        return [mask_to_coco_rle(m.astype(bool)) for m in masks]

    h, w = 90, 120
    teacher = [_disk(h, w, *rng.integers(10, 80, 2), rng.integers(5, 25)).astype(np.uint8) for _ in range(6)]
    student = [np.roll(m, rng.integers(-6, 6), axis=1) for m in teacher[:4]] + [_disk(h, w, 5, 5, 3).astype(np.uint8)]
    got = rle_agreement(rles(teacher), rles(student))
    forward = best_match_ious([m.astype(bool) for m in teacher], [m.astype(bool) for m in student])
    backward = best_match_ious([m.astype(bool) for m in student], [m.astype(bool) for m in teacher])
    assert got["reference_to_predicted"] == pytest.approx(forward.mean(), abs=1e-6)
    assert got["predicted_to_reference"] == pytest.approx(backward.mean(), abs=1e-6)
    assert got["agreement"] == pytest.approx((forward.mean() + backward.mean()) / 2, abs=1e-6)
    assert (got["found"], got["missed"], got["unmatched"]) == (
        int((forward >= 0.5).sum()),
        int((forward < 0.5).sum()),
        int((backward < 0.5).sum()),
    )
    assert rle_agreement(rles(teacher), rles(teacher))["agreement"] == 1.0
    assert rle_agreement([], [])["agreement"] == 1.0
    assert rle_agreement(rles(teacher), [])["agreement"] == 0.0 == rle_agreement([], rles(student))["agreement"]


def _audit_rows(output):
    import pyarrow.parquet as pq

    from pipelines.storage.audit import AUDIT_DIR

    files = sorted((output / AUDIT_DIR).glob("*.parquet"))
    return sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=lambda r: r["image_id"])


def test_audit_of_a_student_by_itself_and_by_its_teacher(ray_local, photos_dir, tmp_path, mobile_sam_path, capsys):
    """A student audited by its own weights agrees fully, on the sampled images only; a rerun keeps
    the table and reports it again; another audit is refused without --overwrite; a broken
    student (random weights) audited by the real model scores low."""
    from pipelines.automask import AuditOptions, AutomaskOptions, automask
    from pipelines.sources import list_images

    ids = sorted(r.image_id for r in list_images(str(photos_dir)))  # the ids the job gives the photos
    # a fraction that samples the two ids of lowest hash: the job must pick exactly those
    hashes = sorted(int(hashlib.sha256(i.encode()).hexdigest()[:16], 16) / 2**64 for i in ids)
    fraction = (hashes[1] + hashes[2]) / 2
    expected = sorted(i for i in ids if sampled(i, fraction))
    assert len(expected) == 2
    out = tmp_path / "masks"
    args = ["--input", str(photos_dir), "--output", str(out), "--checkpoint", str(mobile_sam_path)]
    args += ["--points-per-side", "4", "--audit-checkpoint", str(mobile_sam_path), "--audit-model", "vit_t"]
    assert load_job("automask").main([*args, "--audit-fraction", str(fraction)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.split("SUMMARY ", 1)[1])
    rows = _audit_rows(out)
    assert [r["image_id"] for r in rows] == expected
    assert all(r["agreement"] == 1.0 and r["missed"] == 0 and r["found"] == r["teacher_masks"] > 0 for r in rows)
    assert (summary["written"], summary["audited"], summary["audit_agreement"]) == (3, 2, 1.0)
    assert "teacher audit: 2 images, mean agreement 1.0000" in printed
    # the audit does not change the masks: the audited rows hold as many masks as the teacher found
    masks = {r["image_id"]: r for r in _mask_rows(out)}
    assert all(masks[r["image_id"]]["num_masks"] == r["student_masks"] for r in rows)

    assert load_job("automask").main([*args, "--audit-fraction", str(fraction)]) == 0
    again = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    assert (again["written"], again["skipped"], again["audited"]) == (0, 3, 2)
    assert _audit_rows(out) == rows

    assert load_job("automask").main([*args, "--audit-fraction", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "audit:" in err and "--overwrite" in err, err
    assert _audit_rows(out) == rows

    broken = automask(
        AutomaskOptions(
            CorpusOptions(input=str(photos_dir), output=str(tmp_path / "broken"), limit=1),
            checkpoint=None,
            everything=EVERYTHING,
            audit=AuditOptions(1.0, str(mobile_sam_path), "vit_t"),
        )
    )
    (row,) = _audit_rows(tmp_path / "broken")
    assert broken.audited == 1 and broken.audit_agreement == row["agreement"] < 0.3
    assert row["teacher_masks"] > 0 and row["missed"] >= row["teacher_masks"] // 2


def _mask_rows(output):
    from pipelines.storage.files import read_table

    return read_table(str(output), columns=["image_id", "num_masks"]).to_pylist()


def test_audit_needs_the_images_and_a_sane_fraction(tmp_path):
    from pipelines.automask import AuditOptions, AutomaskOptions

    with pytest.raises(ValueError, match="audit-fraction must be in"):
        AuditOptions(1.5, "mobile_sam")
    with pytest.raises(ValueError, match="needs the images"):
        AutomaskOptions(
            CorpusOptions(input=None, output=str(tmp_path)), embeddings=str(tmp_path), audit=AuditOptions(0.1, "x")
        )
    with pytest.raises(SystemExit):
        load_job("automask").parse(["--input", "x", "--output", "y", "--audit-fraction", "0.1"])
