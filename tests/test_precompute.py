"""The precompute job on a local Ray with the real vit_t as teacher (a seeded vit_t_mini where
only the compiler is under test), on real photos."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.options import CorpusOptions
from tinysam import SamPredictor

from .helpers import flags, kill_midway_and_rerun, load_job

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "precompute_embeddings.py"


def test_stored_embeddings_equal_the_predictor_and_reruns_skip(ray_local, photos_dir, tmp_path, vit_t, mobile_sam_path):
    from PIL import Image

    from pipelines.precompute import PrecomputeOptions, precompute_embeddings
    from pipelines.storage.embeddings import load_embeddings
    from pipelines.storage.files import read_table

    out = tmp_path / "emb"
    summary = precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(photos_dir), output=str(out), batch_size=2),
            teacher="vit_t",
            checkpoint=str(mobile_sam_path),
        )
    )
    assert (summary.written, summary.failed, summary.skipped) == (3, 0, 0)
    # start-up apart from the rate: the first rows came back inside the run
    assert 0 < summary.first_result_seconds <= summary.seconds and 1 <= summary.first_result_rows <= 3
    ids, stored = load_embeddings(str(out))
    assert stored.shape == (3, 256, 64, 64) and stored.dtype == torch.float16
    some_ids, some = load_embeddings(str(out), [ids[2], ids[0]])  # a filtered read: those rows only
    assert sorted(some_ids) == sorted([ids[0], ids[2]])
    for image_id, emb in zip(some_ids, some):
        assert torch.equal(emb, stored[ids.index(image_id)])
    table = read_table(str(out))
    sources = dict(zip(table["image_id"].to_pylist(), table["source"].to_pylist()))
    assert set(table["teacher"].to_pylist()) == {"vit_t"}
    predictor = SamPredictor(vit_t)
    for image_id, emb in zip(ids, stored):
        predictor.set_image(np.array(Image.open(sources[image_id]).convert("RGB")))
        ref = predictor.get_image_embedding()[0]
        # fp16 storage: within half an fp16 ulp of the fp32 embedding (plus batch-order noise).
        assert ((emb.float() - ref).abs() <= ref.abs() * 2.0**-11 + 1e-4).all()
    mib = summary.bytes_written / 3 / 2**20
    assert mib < 2.1, f"{mib:.2f} MiB per image"

    again = precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(photos_dir), output=str(out)), teacher="vit_t", checkpoint=str(mobile_sam_path)
        )
    )
    assert (again.written, again.skipped) == (0, 3)
    assert read_table(str(out)).num_rows == 3


def test_compiled_teacher_stores_the_eager_embeddings(ray_local, photos_dir, tmp_path):
    """--compile: the actor's encoder compiled by Inductor (on the CPU here) stores the embeddings
    of the eager encoder, to float32 rounding. The teacher is a seeded vit_t_mini: the property
    is the compiler's, and its compile takes half of vit_t's on a CI core."""
    from PIL import Image

    from pipelines.storage.embeddings import load_embeddings
    from pipelines.storage.files import read_table
    from tinysam import build_sam

    torch.manual_seed(0)
    teacher = build_sam("vit_t_mini").eval()
    checkpoint = tmp_path / "vit_t_mini.pth"
    torch.save(teacher.state_dict(), checkpoint)
    out = tmp_path / "emb"
    args = flags(input=photos_dir, output=out, teacher="vit_t_mini", checkpoint=checkpoint, batch_size=4)
    assert load_job("precompute_embeddings").main([*args, *flags(dtype="float32", limit=2), "--compile"]) == 0
    ids, stored = load_embeddings(str(out))
    sources = dict(zip(*(read_table(str(out))[k].to_pylist() for k in ("image_id", "source"))))
    assert len(ids) == 2 and stored.dtype == torch.float32
    predictor = SamPredictor(teacher)
    for image_id, emb in zip(ids, stored):
        predictor.set_image(np.array(Image.open(sources[image_id]).convert("RGB")))
        ref = predictor.get_image_embedding()[0]
        assert ref.abs().max().item() > 0
        assert (emb - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()


def test_a_ragged_batch_is_padded_to_the_shape_already_compiled(photos_dir, mobile_sam_path):
    """Where the encoder is compiled (CUDA's fused attention, --compile), a batch smaller than one
    already seen (failed images, a block's last rows) is zero-padded to that size, so no new shape
    compiles; the padding leaves the real rows' embeddings as they were."""
    from pipelines.actors import SamActor
    from pipelines.reading import prepare_images, read_sources
    from pipelines.sources import list_images

    refs = list_images(str(photos_dir))[:2]
    batch = prepare_images(
        read_sources({"image_id": np.array([r.image_id for r in refs]), "source": np.array([r.source for r in refs])})
    )
    actor = SamActor("vit_t", str(mobile_sam_path), device="cpu", cpu_threads=2)
    actor.pad_batches = True  # as on CUDA
    shapes = []
    actor.sam.image_encoder.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    with torch.inference_mode():
        both = actor.encode(batch, np.array([0, 1]))
        second = actor.encode(batch, np.array([1]))
    assert [s[0] for s in shapes] == [2, 2] and tuple(second.shape) == (1, 256, 64, 64)
    assert (second[0] - both[1]).abs().max().item() <= 1e-4 * both[1].abs().max().item()


def test_bad_inputs_are_recorded_and_the_rest_is_written(ray_local, photos_dir, tmp_path, mobile_sam_path):
    from pipelines.precompute import PrecomputeOptions, precompute_embeddings
    from pipelines.storage.errors import read_errors
    from pipelines.storage.files import read_table

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = (photos_dir / "coffee.jpg").read_bytes()
    (corpus / "coffee.jpg").write_bytes(good)
    (corpus / "truncated.jpg").write_bytes(good[: len(good) // 4])
    (corpus / "notes.png").write_text("this is a text file with an image name\n")
    (corpus / "empty.jpg").write_bytes(b"")
    out = tmp_path / "emb"
    summary = precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(corpus), output=str(out), batch_size=2),
            teacher="vit_t",
            checkpoint=str(mobile_sam_path),
        )
    )  # the good image shares its batch with a bad one
    assert (summary.written, summary.failed) == (1, 3)
    assert read_table(str(out))["image_id"].to_pylist()[0].startswith("coffee")
    errors = read_errors(str(out)).to_pylist()
    reasons = {Path(e["source"]).name: e["reason"] for e in errors}
    assert set(reasons) == {"truncated.jpg", "notes.png", "empty.jpg"}
    for name, reason in reasons.items():
        assert name in reason
    assert "empty" in reasons["empty.jpg"]

    from pipelines.results import TooManyFailures

    with pytest.raises(TooManyFailures, match="more than --max-failures 0"):
        precompute_embeddings(
            PrecomputeOptions(
                CorpusOptions(input=str(corpus), output=str(tmp_path / "strict"), batch_size=4, max_failures=0),
                teacher="vit_t",
                checkpoint=str(mobile_sam_path),
            )
        )


def test_unwritable_output_fails_before_any_work(tmp_path, photos_dir, mobile_sam_path):
    from pipelines.precompute import PrecomputeOptions, precompute_embeddings

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="a-file/out: output location is not writable"):
        precompute_embeddings(
            PrecomputeOptions(
                CorpusOptions(input=str(photos_dir), output=str(blocker / "out")),
                teacher="vit_t",
                checkpoint=str(mobile_sam_path),
            )
        )


def test_unreadable_checkpoint_fails_before_any_work(ray_local, tmp_path, photos_dir, capsys):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "emb"
    # the job's own main, in this process (on this process's Ray): no second Python start
    job = load_job("precompute_embeddings")
    assert job.main(flags(input=photos_dir, output=out, teacher="vit_t", checkpoint=bad, num_cpus=2)) == 2
    err = capsys.readouterr().err
    assert "broken.pth" in err and "corrupt" in err
    assert not out.exists()


def test_killed_job_resumes_with_exactly_one_row_per_image(tmp_path, photos_dir, mobile_sam_path):
    from pipelines.storage.files import read_table

    out = tmp_path / "emb"
    args = flags(input=photos_dir, output=out, teacher="vit_t", checkpoint=mobile_sam_path, batch_size=1)
    cmd = [sys.executable, str(JOB), *args, *flags(rows_per_file=1, num_cpus=2)]
    kill_midway_and_rerun(cmd, out, total=3)
    ids = read_table(str(out), columns=["image_id"])["image_id"].to_pylist()
    assert len(ids) == 3 and len(set(ids)) == 3


def test_s3_round_trip(ray_local, photos_dir, s3_endpoint, mobile_sam_path):
    import s3fs

    from pipelines.precompute import PrecomputeOptions, precompute_embeddings
    from pipelines.storage.embeddings import load_embeddings

    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("corpus")
    for name in ("astronaut.jpg", "coffee.jpg"):
        fs.put(str(photos_dir / name), f"corpus/images/{name}")
    summary = precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(
                input="s3://corpus/images", output="s3://corpus/embeddings", batch_size=2, storage_options=options
            ),
            teacher="vit_t",
            checkpoint=str(mobile_sam_path),
        )
    )
    assert (summary.written, summary.failed) == (2, 0)
    files = fs.find("corpus/embeddings")
    assert files and all(f.endswith(".parquet") for f in files)
    ids, emb = load_embeddings("s3://corpus/embeddings", storage_options=options)
    assert len(ids) == 2 and emb.shape == (2, 256, 64, 64)
    assert all(i.startswith(("astronaut-", "coffee-")) for i in ids)


def test_sa1b_tar_shard_keeps_ids_and_annotations(ray_local, photos_dir, tmp_path, mobile_sam_path):
    import io
    import json
    import tarfile

    from pipelines.precompute import PrecomputeOptions, precompute_embeddings
    from pipelines.storage.files import read_table
    from tinysam.utils.rle import mask_to_coco_rle

    shard = tmp_path / "sa_000000.tar"
    with tarfile.open(shard, "w") as tar:
        for n, name in ((7, "coffee.jpg"), (3, "chelsea.jpg")):
            data = (photos_dir / name).read_bytes()
            mask = np.zeros((300, 451), bool) if name == "chelsea.jpg" else np.zeros((400, 600), bool)
            mask[50:120, 60:200] = True
            ann = {
                "image": {"image_id": n, "width": mask.shape[1], "height": mask.shape[0], "file_name": f"sa_{n}.jpg"},
                "annotations": [
                    {
                        "id": 1,
                        "segmentation": mask_to_coco_rle(mask),
                        "bbox": [60, 50, 140, 70],
                        "area": int(mask.sum()),
                        "point_coords": [[100, 80]],
                        "predicted_iou": 0.9,
                        "stability_score": 0.95,
                        "crop_box": [0, 0, mask.shape[1], mask.shape[0]],
                    }
                ],
            }
            for member, payload in ((f"sa_{n}.jpg", data), (f"sa_{n}.json", json.dumps(ann).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "emb"
    first = precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(shard), output=str(out), limit=1), teacher="vit_t", checkpoint=str(mobile_sam_path)
        )
    )
    assert (first.written, first.failed) == (1, 0)
    [first_id] = read_table(str(out))["image_id"].to_pylist()
    rest = precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(shard), output=str(out)), teacher="vit_t", checkpoint=str(mobile_sam_path)
        )
    )
    assert (rest.written, rest.skipped) == (1, 1)
    table = read_table(str(out)).to_pylist()
    assert sorted(r["image_id"] for r in table) == ["3", "7"] and first_id in ("3", "7")
    for row in table:
        ann = json.loads(row["annotations"])
        assert ann["image"]["image_id"] == int(row["image_id"])
        assert ann["annotations"][0]["segmentation"]["size"] == [row["orig_h"], row["orig_w"]]
        # the stored byte range is the image's own bytes in the shard
        with open(shard, "rb") as f:
            f.seek(row["source_offset"])
            assert (
                f.read(row["source_length"])
                == (photos_dir / ("coffee.jpg" if row["image_id"] == "7" else "chelsea.jpg")).read_bytes()
            )
    # every image written: a third run does not open the shard (its manifest says it is complete)
    shard.rename(tmp_path / "moved.tar")
    shard.write_bytes(b"")  # same name, no content: reading it would fail
    again = precompute_embeddings(
        PrecomputeOptions(
            CorpusOptions(input=str(shard), output=str(out)), teacher="vit_t", checkpoint=str(mobile_sam_path)
        )
    )
    assert (again.written, again.failed, again.skipped) == (0, 0, 2)
