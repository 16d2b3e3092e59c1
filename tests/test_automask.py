"""The bulk auto-masking job on a local Ray with the real vit_t, on real photos.

Everything mode runs at 8x8 points (2x2 in round 1) to keep the suite short; the code path is the
default one (hierarchical, encoder in the actor, decoder batched over the batch's images).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.options import CorpusOptions
from tinysam import SamHierarchicalMaskGenerator
from tinysam.everything import EverythingConfig
from tinysam.utils.metrics import best_match_ious
from tinysam.utils.polygons import PolygonRules
from tinysam.utils.rle import coco_rle_to_mask

from .helpers import load_job

EVERYTHING = EverythingConfig(points_per_side=8)


def _rows(output, storage_options=None):
    from pipelines.storage.masks import iter_results

    return {r["image_id"]: r for r in iter_results(str(output), storage_options=storage_options)}


def test_job_output_equals_the_in_process_generator(ray_local, photos_dir, tmp_path, vit_t, mobile_sam_path, capsys):
    from pycocotools.coco import COCO

    from pipelines.automask import AutomaskOptions, automask

    out = tmp_path / "masks"
    summary = automask(
        AutomaskOptions(
            CorpusOptions(input=str(photos_dir), output=str(out), batch_size=2, num_cpus_per_actor=2),
            model="vit_t",
            checkpoint=str(mobile_sam_path),
            everything=EVERYTHING,
            sa1b_json=True,
            coco_json=str(out / "coco.json"),
            preview=2,
        )
    )
    assert (summary.written, summary.failed, summary.skipped) == (3, 0, 0)
    rows = _rows(out)
    assert summary.masks == sum(len(r["masks"]) for r in rows.values()) > 0
    generator = SamHierarchicalMaskGenerator(vit_t, output_mode="coco_rle", **EVERYTHING.generator_kwargs())
    from pipelines.storage.files import read_table

    params = set(read_table(str(out), columns=["params"])["params"].to_pylist())
    assert [EverythingConfig.from_dict(json.loads(p)) for p in params] == [EVERYTHING]  # the settings, stored
    for image_id, row in rows.items():
        image = np.array(Image.open(row["source"]).convert("RGB"))
        assert (row["height"], row["width"]) == image.shape[:2]
        expected = generator.generate(image)
        got = row["masks"]
        assert len(got) == len(expected) > 0, image_id
        for mask in got:  # every RLE decodes with pycocotools to the image size
            assert coco_rle_to_mask(mask["segmentation"]).shape == image.shape[:2]
        ious = best_match_ious(
            [coco_rle_to_mask(r["segmentation"]) for r in expected], [coco_rle_to_mask(m["segmentation"]) for m in got]
        )
        assert ious.min() >= 0.99, f"{image_id}: {np.sort(ious)[:3]}"
        same = sum(m["segmentation"] == r["segmentation"] for m, r in zip(got, expected))
        assert same >= 0.9 * len(got), f"{image_id}: {same} of {len(got)} RLEs identical"
        for m, r in zip(got, expected):
            assert m["bbox"] == pytest.approx(r["bbox"], abs=1) and m["crop_box"] == r["crop_box"]
            assert m["predicted_iou"] == pytest.approx(r["predicted_iou"], abs=1e-3)
        # SA-1B per-image JSON holds the same masks
        doc = json.loads((out / "sa1b" / f"{image_id}.json").read_text())
        assert doc["image"] == {
            "image_id": image_id,
            "width": row["width"],
            "height": row["height"],
            "file_name": row["source"],
        }
        assert [a["segmentation"] for a in doc["annotations"]] == [m["segmentation"] for m in got]

    coco = COCO(str(out / "coco_images.json"))
    results = coco.loadRes(str(out / "coco.json"))
    assert len(results.anns) == summary.masks and len(coco.imgs) == 3
    # each annotation belongs to its image: the mask's size is the image's, and the image entry's
    # size is the photo's own
    by_file = {row["source"]: row for row in rows.values()}
    for image in coco.imgs.values():
        row = by_file[image["file_name"]]
        assert (image["height"], image["width"]) == (row["height"], row["width"])
        anns = results.imgToAnns[image["id"]]
        assert len(anns) == len(row["masks"]) > 0
        assert all(a["segmentation"]["size"] == [row["height"], row["width"]] for a in anns)
    coco_before = (out / "coco.json").read_text()
    previews = sorted((out / "previews").glob("*.png"))
    assert [p.stem for p in previews] == sorted(rows)[:2]
    assert Image.open(previews[0]).size == (rows[previews[0].stem]["width"], rows[previews[0].stem]["height"])

    # A rerun through the job's own entry point (in this process, on this Ray) skips every image.
    rerun = [
        "--input",
        str(photos_dir),
        "--output",
        str(out),
        "--checkpoint",
        str(mobile_sam_path),
        "--points-per-side",
        "8",
    ]
    assert load_job("automask").main([*rerun, "--coco-json", str(out / "coco.json")]) == 0
    again = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    assert (again["written"], again["skipped"]) == (0, 3)
    assert json.loads((out / "coco.json").read_text()) == json.loads(coco_before)  # every mask still there

    # Stored embeddings (the precompute job's) replace the encoder: the same masks as the job from
    # the images, up to a few border pixels (fp16 storage of the embedding).
    from pipelines.precompute import PrecomputeOptions, precompute_embeddings

    emb = tmp_path / "emb"
    precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(photos_dir), output=str(emb), limit=2),
            teacher="vit_t",
            checkpoint=str(mobile_sam_path),
        )
    )
    stored = automask(
        AutomaskOptions(
            CorpusOptions(input=None, output=str(tmp_path / "from-stored")),
            checkpoint=str(mobile_sam_path),
            everything=EVERYTHING,
            embeddings=str(emb),
        )
    )
    assert (stored.written, stored.failed) == (2, 0)
    assert stored.encode_seconds < 0.2  # the encoder did not run (it takes over a second per image here)
    from_stored = _rows(tmp_path / "from-stored")
    assert len(from_stored) == 2
    for image_id, row in from_stored.items():
        ious = best_match_ious(
            [coco_rle_to_mask(m["segmentation"]) for m in rows[image_id]["masks"]],
            [coco_rle_to_mask(m["segmentation"]) for m in row["masks"]],
        )
        assert len(row["masks"]) > 0 and ious.min() >= 0.98, image_id
    with pytest.raises(ValueError, match="decoder must match the encoder"):
        automask(
            AutomaskOptions(
                CorpusOptions(input=None, output=str(tmp_path / "other")),
                checkpoint=None,
                everything=EVERYTHING,
                embeddings=str(emb),
            )
        )


def test_bad_inputs_are_reported_and_skipped(ray_local, photos_dir, tmp_path, mobile_sam_path):
    from pipelines.automask import AutomaskOptions, automask
    from pipelines.storage.errors import read_errors

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = (photos_dir / "coffee.jpg").read_bytes()
    (corpus / "coffee.jpg").write_bytes(good)
    (corpus / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (corpus / "readme.png").write_text("not an image\n")
    out = tmp_path / "masks"
    summary = automask(
        AutomaskOptions(
            CorpusOptions(input=str(corpus), output=str(out), batch_size=3),
            model="vit_t",
            checkpoint=str(mobile_sam_path),
            everything=EverythingConfig(points_per_side=4),
        )
    )  # one batch: the good image's row survives
    assert (summary.written, summary.failed) == (1, 2)
    [image_id] = _rows(out)
    assert image_id.startswith("coffee")
    reasons = {Path(e["source"]).name: e["reason"] for e in read_errors(str(out)).to_pylist()}
    assert set(reasons) == {"corrupt.jpg", "readme.png"}
    assert all(name in reason for name, reason in reasons.items())


def test_bad_parameters_fail_before_any_work(tmp_path, photos_dir, capsys):
    with pytest.raises(ValueError, match="no setting point_per_side"):
        EverythingConfig.from_dict({"point_per_side": 8})
    with pytest.raises(ValueError, match="no setting round1_points_per_side"):
        EverythingConfig(mode="dense", round1_points_per_side=4)
    with pytest.raises(SystemExit) as exit_status:  # argparse's refusal, exit status 2
        load_job("automask").main(["--input", str(photos_dir), "--output", str(tmp_path / "c"), "--mode", "sparse"])
    assert exit_status.value.code == 2 and "invalid choice: 'sparse'" in capsys.readouterr().err
    base = ["--input", str(photos_dir), "--output", str(tmp_path / "d"), "--checkpoint", "none"]
    with pytest.raises(SystemExit) as exit_status:
        load_job("automask").main([*base, "--polygons", "--polygon-tolerance", "-1"])
    assert exit_status.value.code == 2 and "polygon tolerance" in capsys.readouterr().err
    options, _ = load_job("automask").parse([*base, "--polygons", "--polygon-min-area", "4"])
    assert options.polygons == PolygonRules(min_area=4) and load_job("automask").parse(base)[0].polygons is None
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_s3_in_and_out(ray_local, photos_dir, s3_endpoint, mobile_sam_path):
    import s3fs
    from pycocotools.coco import COCO

    from pipelines.automask import AutomaskOptions, automask

    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("automask")
    for name in ("astronaut.jpg", "chelsea.jpg"):
        fs.put(str(photos_dir / name), f"automask/images/{name}")
    summary = automask(
        AutomaskOptions(
            CorpusOptions(input="s3://automask/images", output="s3://automask/masks", storage_options=options),
            checkpoint=str(mobile_sam_path),
            everything=EverythingConfig(points_per_side=4),
            coco_json="s3://automask/masks/coco.json",
            preview=1,
            polygons=PolygonRules(),
        )
    )
    assert (summary.written, summary.failed) == (2, 0)
    rows = _rows("s3://automask/masks", options)
    assert {r["source"] for r in rows.values()} == {
        "s3://automask/images/astronaut.jpg",
        "s3://automask/images/chelsea.jpg",
    }
    assert len(fs.glob("automask/masks/previews/*.png")) == 1
    with fs.open("automask/masks/coco_images.json") as f:
        images = json.load(f)
    with fs.open("automask/masks/coco.json") as f:
        results = json.load(f)
    coco = COCO()
    coco.dataset = images
    coco.createIndex()
    assert len(coco.loadRes(results).anns) == summary.masks  # the results file keeps the RLEs
    # --polygons: each stored mask has its polygons, and a whole COCO dataset holds them
    masks = [m for r in rows.values() for m in r["masks"]]
    assert masks and all(m["polygons"] for m in masks)
    with fs.open("automask/masks/coco_polygons.json") as f:
        dataset = COCO()
        dataset.dataset = json.load(f)
    dataset.createIndex()
    assert len(dataset.anns) == summary.masks and dataset.getImgIds() == coco.getImgIds()
    for ann in dataset.anns.values():
        image = dataset.imgs[ann["image_id"]]
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)
        assert dataset.annToMask(ann).shape == (image["height"], image["width"])


def test_killed_job_resumes_with_exactly_one_row_per_image(tmp_path, photos_dir, mobile_sam_path):
    """SIGKILLed (driver and its local Ray) after its first file, the rerun writes only the rest."""
    import sys

    from pipelines.storage.files import read_table

    from .helpers import flags, kill_midway_and_rerun

    out = tmp_path / "masks"
    job = Path(__file__).resolve().parents[1] / "jobs" / "automask.py"
    args = flags(input=photos_dir, output=out, checkpoint=mobile_sam_path, points_per_side=4, batch_size=1)
    kill_midway_and_rerun([sys.executable, str(job), *args, *flags(rows_per_file=1, num_cpus=2)], out, total=3)
    table = read_table(str(out), columns=["image_id", "num_masks"])
    ids = table["image_id"].to_pylist()
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(n > 0 for n in table["num_masks"].to_pylist())
