"""Poison inputs and careless reruns, each through a job's own entry point (main(argv), in this
process, on this process's Ray): one image never stalls a job, a rerun never mixes models."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from .helpers import flags, load_job

FAST = ["--points-per-side", "4", "--num-cpus", "4"]


def run(job: str, argv: list, capsys) -> tuple:
    """(exit status, the SUMMARY dict or None, stdout + stderr) of a job's main."""
    code = load_job(job).main(argv)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    summary = next((json.loads(line[8:]) for line in captured.out.splitlines() if line.startswith("SUMMARY ")), None)
    return code, summary, out


@pytest.fixture
def corpus(tmp_path, photos_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg"):
        shutil.copy(photos_dir / name, folder / name)
    return folder


def big_bilevel_png(path) -> None:
    """A 7000x7000 1-bit PNG (49 Mpx, above the default limit) of a few shapes: ~10 KB on disk,
    147 MB as RGB."""
    pixels = np.ones((7000, 7000), bool)
    pixels[1200:2900, 1700:5200] = False
    pixels[4100:6400, 600:2300] = False
    Image.fromarray(pixels).save(path, optimize=True)


def test_a_huge_small_file_never_stalls_the_job(ray_local, corpus, tmp_path, mobile_sam_path, capsys):
    """The 49 Mpx PNG beside good photos: with the default pixel limit it is reported from its
    header; with the limit raised and the actor's memory capped it is masked or reported alone
    (everything mode keeps one full-resolution mask chunk at a time). Either way the job ends and
    the good images are written."""
    from pipelines.storage.errors import read_errors
    from pipelines.storage.files import read_table

    big_bilevel_png(corpus / "scan.png")
    assert (corpus / "scan.png").stat().st_size < 100_000
    out = tmp_path / "masks"
    code, summary, log = run(
        "automask", ["--input", str(corpus), "--output", str(out), "--checkpoint", str(mobile_sam_path), *FAST], capsys
    )
    assert code == 1 and (summary["written"], summary["failed"]) == (2, 1), log
    [reason] = read_errors(str(out))["reason"].to_pylist()
    assert "scan.png: 7000x7000 is 49.0 Mpx, above the limit of 40.0 Mpx" in reason

    out = tmp_path / "masks-capped"
    args = flags(input=corpus, output=out, checkpoint=mobile_sam_path, max_megapixels=60, actor_memory_gb=2)
    # 2x2 points: each candidate mask is drawn at 49 Mpx, and the property is the job's, not the masks'
    args += flags(points_per_side=2, num_cpus=4)
    code, summary, log = run("automask", args, capsys)
    assert summary is not None and summary["written"] >= 2 and summary["written"] + summary["failed"] == 3, log
    rows = read_table(str(out), columns=["image_id", "width", "height"]).to_pylist()
    assert {r["image_id"].split("-")[0] for r in rows} >= {"coffee", "chelsea"}
    for row in rows:
        if row["image_id"].startswith("scan"):
            assert (row["width"], row["height"]) == (7000, 7000)
    errors = read_errors(str(out))["reason"].to_pylist()
    assert summary["failed"] == len(errors) and all("scan.png" in e for e in errors)
    print(
        f"\n49 Mpx PNG with --max-megapixels 60 --actor-memory-gb 2: "
        f"{'written' if summary['failed'] == 0 else errors[0][:200]}"
    )


def test_a_rerun_with_another_checkpoint_is_refused_then_redone_with_overwrite(
    ray_local, corpus, tmp_path, mobile_sam_path, capsys
):
    from pipelines.storage.files import read_table

    out = tmp_path / "masks"
    args = ["--input", str(corpus), "--output", str(out), *FAST]
    code, summary, _ = run("automask", [*args, "--checkpoint", str(mobile_sam_path)], capsys)
    assert code == 0 and summary["written"] == 2
    code, _, log = run("automask", [*args, "--checkpoint", "none"], capsys)
    assert code == 2 and "holds rows made with other settings" in log and "checkpoint_sha256" in log
    assert "random-init" in log and "--overwrite" in log
    code, summary, log = run(
        "automask", [*args, "--points-per-side", "8", "--checkpoint", str(mobile_sam_path)], capsys
    )
    assert code == 2 and "params.points_per_side: 4 -> 8" in log  # another generator setting, named: refused too
    code, summary, _ = run("automask", [*args, "--checkpoint", "none", "--overwrite"], capsys)
    assert code == 0 and summary["written"] == 2
    table = read_table(str(out), columns=["image_id", "checkpoint_sha256"])
    assert table.num_rows == 2 and set(table["checkpoint_sha256"].to_pylist()) == {"random-init"}
    code, summary, _ = run("automask", [*args, "--checkpoint", "none"], capsys)  # same settings: skips
    assert code == 0 and (summary["written"], summary["skipped"]) == (0, 2)
    # settings of speed and memory only (as a rerun on GPU nodes changes them): not refused, skips
    code, summary, _ = run("automask", [*args, "--checkpoint", "none", "--decoder-chunk", "3"], capsys)
    assert code == 0 and (summary["written"], summary["skipped"]) == (0, 2)


def test_output_inside_input_is_never_read_as_input(ray_local, corpus, mobile_sam_path, capsys):
    out = corpus / "masks"
    args = [*flags(input=corpus, output=out, checkpoint=mobile_sam_path, preview=2, coco_json=out / "coco.json"), *FAST]
    code, first, _ = run("automask", args, capsys)
    assert code == 0 and (first["images"], first["written"]) == (2, 2)
    assert len(list((out / "previews").glob("*.png"))) == 2
    code, second, _ = run("automask", args, capsys)
    assert code == 0 and (second["images"], second["written"], second["skipped"]) == (2, 0, 2)


def test_exif_orientation_is_applied_as_opencv_reads_the_file(
    ray_local, tmp_path, photos_dir, vit_t, mobile_sam_path, capsys
):
    """A phone photo stored sideways with EXIF orientation 6: masked as viewers and cv2.imread
    (the official scripts/amg.py reader) show it, at the displayed size."""
    import cv2

    from pipelines.storage.masks import iter_results
    from tinysam.everything import EverythingConfig
    from tinysam.utils.metrics import best_match_ious
    from tinysam.utils.rle import coco_rle_to_mask

    corpus = tmp_path / "phone"
    corpus.mkdir()
    stored = Image.open(photos_dir / "coffee.jpg")  # 600x400, stored rotated for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.rotate(90, expand=True).save(corpus / "phone.jpg", exif=exif.tobytes(), quality=95)
    out = tmp_path / "masks"
    code, _, _ = run(
        "automask", ["--input", str(corpus), "--output", str(out), "--checkpoint", str(mobile_sam_path), *FAST], capsys
    )
    assert code == 0
    [row] = list(iter_results(str(out)))
    shown = cv2.imread(str(corpus / "phone.jpg"))[:, :, ::-1]  # applies the orientation
    assert (row["height"], row["width"]) == shown.shape[:2] == (400, 600)
    generator = EverythingConfig(points_per_side=4).generator(vit_t, output_mode="coco_rle")  # the job's
    expected = generator.generate(np.ascontiguousarray(shown))
    got = [coco_rle_to_mask(m["segmentation"]) for m in row["masks"]]
    assert len(got) == len(expected) > 0
    ious = best_match_ious([coco_rle_to_mask(r["segmentation"]) for r in expected], got)
    assert ious.min() >= 0.98, np.sort(ious)[:3]


def test_refusals_before_any_work(ray_local, corpus, tmp_path, mobile_sam_path, capsys):
    out = tmp_path / "masks"
    for job in ("automask", "precompute_embeddings"):  # no --checkpoint: argparse's exit 2, naming the flag
        with pytest.raises(SystemExit) as status:
            load_job(job).main(["--input", str(corpus), "--output", str(out)])
        assert status.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as status:  # abbreviated flags are not guessed
        load_job("automask").main(
            ["--input", str(corpus), "--output", str(out), "--checkpoint", "none", "--points-per-sid", "4"]
        )
    assert status.value.code == 2
    with pytest.raises(SystemExit):
        load_job("precompute_embeddings").main(["--help"])
    assert "exit status:" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, log = run("automask", ["--input", str(empty), "--output", str(out), "--checkpoint", "none"], capsys)
    assert code == 2 and f"no images found under {empty}" in log
    assert not out.exists() or not list(out.glob("*.parquet"))


def test_unsupported_and_tiny_files_are_counted_and_named(ray_local, corpus, tmp_path, mobile_sam_path, capsys):
    from pipelines.storage.errors import read_errors

    Image.new("RGB", (1, 1)).save(corpus / "dot.png")
    Image.new("RGB", (64, 64)).save(corpus / "anim.gif")
    out = tmp_path / "masks"
    code, summary, log = run(
        "automask", ["--input", str(corpus), "--output", str(out), "--checkpoint", str(mobile_sam_path), *FAST], capsys
    )
    assert code == 1 and (summary["written"], summary["failed"]) == (2, 1)
    assert summary["unsupported"] == [str(corpus / "anim.gif")] and "unsupported: " in log
    [reason] = read_errors(str(out))["reason"].to_pylist()
    assert "dot.png: 1x1 px is below the 16 px minimum" in reason


def test_an_image_that_kills_its_actor_is_reported_after_three_attempts(ray_local, corpus, tmp_path, photos_dir):
    """The jobs' stages with a model actor that dies on one image: Ray restarts the actor and
    retries the batch, 3 attempts in all; then the batch is dropped, the image goes to the errors
    table, and the other images are written."""
    import ray

    from pipelines.options import CorpusOptions
    from pipelines.precompute import write_batch
    from pipelines.reading import plan_inputs
    from pipelines.results import JobSummary, finish_summary, run_to_output
    from pipelines.stages import ModelStage, image_pipeline
    from pipelines.storage.errors import read_errors
    from pipelines.storage.files import read_table

    from . import helpers

    ray.cloudpickle.register_pickle_by_value(helpers)
    shutil.copy(photos_dir / "astronaut.jpg", corpus / "a-poison.jpg")  # first in the plan
    out = tmp_path / "emb"
    provenance = {"model": "stand-in", "checkpoint_sha256": "none", "dtype": "float16"}
    plan = plan_inputs(str(corpus), str(out), provenance)
    stage = ModelStage(helpers.DyingEncoder, {}, write_batch, {"output": str(out), "provenance": provenance})
    ds = image_pipeline(plan, stage, CorpusOptions(input=str(corpus), output=str(out)))
    summary = JobSummary()
    run_to_output(ds, summary, str(out))
    finish_summary(summary, plan, str(out))
    assert (summary.written, summary.failed, summary.images) == (2, 1, 3)
    assert sorted(i.split("-")[0] for i in read_table(str(out), columns=["image_id"])["image_id"].to_pylist()) == [
        "chelsea",
        "coffee",
    ]
    [reason] = read_errors(str(out))["reason"].to_pylist()
    assert "poison.jpg" in reason and "killed the model actor 3 times" in reason
