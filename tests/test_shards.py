"""SA-1B tar shards through the jobs' own read path: one pass per shard, on local disk and S3;
resume without reopening finished shards; a damaged shard costs its rest, not the job."""

import json

import numpy as np
import pyarrow as pa
import pytest

from tinysam_samples import write_synthetic_sa1b_shard

from .helpers import CountingFileSystem, read_counts

MEMBERS = 24


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """An SA-1B-like shard: 24 JPEGs of 1500x2250 (a few hundred KB each) and their JSONs."""
    return write_synthetic_sa1b_shard(tmp_path_factory.mktemp("shards") / "sa_000001.tar", MEMBERS, masks_per_image=20)


def counting(inner, log):
    """`storage_options` that count the bytes read, in this process and in Ray's workers."""
    import ray

    from . import helpers

    ray.cloudpickle.register_pickle_by_value(helpers)
    return {"filesystem": CountingFileSystem(inner, str(log))}


def read_all(url: str, output: str, options: dict):
    """The plan and the rows of the jobs' read side (reading.plan_inputs + stages.read_dataset)."""
    from pipelines.options import CorpusOptions
    from pipelines.reading import plan_inputs
    from pipelines.stages import read_dataset

    plan = plan_inputs(url, output, {"model": "test"}, storage_options=options)
    if not plan.shards and not plan.files:
        return plan, []
    ds = read_dataset(plan, CorpusOptions(input=url, output=output, batch_size=4, storage_options=options))
    return plan, ds.select_columns(["image_id", "source", "annotations", "error", "orig_h", "orig_w"]).take_all()


def mark_done(output: str, ids, options: dict) -> None:
    """Rows of `ids` in the output, as a job would have written them."""
    from pipelines.storage.files import write_table_atomic

    write_table_atomic(
        pa.table({"image_id": pa.array(list(ids), pa.string())}),
        output,
        "part-done.parquet",
        options,
        provenance={"model": "test"},
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_is_read_once_and_a_finished_one_not_at_all(ray_local, shard, tmp_path, s3_endpoint, where):
    from fsspec.implementations.local import LocalFileSystem

    size = shard.stat().st_size
    log = tmp_path / "reads.log"
    if where == "s3":
        import s3fs

        inner = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_endpoint})
        if not inner.exists("sa1b"):
            inner.mkdir("sa1b")
        inner.put(str(shard), "sa1b/shards/sa_000001.tar")
        url, output = "s3://sa1b/shards", "s3://sa1b/out"
    else:
        inner, url, output = LocalFileSystem(), str(shard.parent), str(tmp_path / "out")
    options = counting(inner, log)

    plan, rows = read_all(url, output, options)
    assert len(plan.shards) == 1 and not plan.files  # the driver lists the shard, not its members
    assert sorted(r["image_id"] for r in rows) == sorted(str(n) for n in range(1, MEMBERS + 1))
    for row in rows:
        assert not row["error"] and (row["orig_h"], row["orig_w"]) == (1500, 2250)
        assert json.loads(row["annotations"])["image"]["image_id"] == int(row["image_id"])
    reads = read_counts(str(log), "sa_000001.tar")
    assert reads["opens"] == 1 and size * 0.9 <= reads["bytes"] <= size * 1.1, (reads, size)

    # Half the images written: the rerun reads the shard once more and passes over the finished ones.
    mark_done(output, [str(n) for n in range(1, MEMBERS // 2 + 1)], options)
    plan, rows = read_all(url, output, options)
    assert sorted(int(r["image_id"]) for r in rows) == list(range(MEMBERS // 2 + 1, MEMBERS + 1))
    # All written: the manifest says the shard is complete, and it is not opened again.
    mark_done(output, [str(n) for n in range(1, MEMBERS + 1)], options)
    before = read_counts(str(log), "sa_000001.tar")
    plan, rows = read_all(url, output, options)
    assert rows == [] and plan.skipped == MEMBERS and not plan.shards
    assert read_counts(str(log), "sa_000001.tar") == before


def test_a_damaged_shard_keeps_the_images_before_the_damage(ray_local, shard, tmp_path):
    cut = tmp_path / "in" / "sa_000002.tar"
    cut.parent.mkdir()
    data = shard.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    plan, rows = read_all(str(cut.parent), str(tmp_path / "out"), {})
    good = [r for r in rows if not r["error"]]
    [bad] = [r for r in rows if r["error"]]
    assert 10 <= len(good) < MEMBERS and "sa_000002.tar: damaged tar shard" in bad["error"]
    assert not (tmp_path / "out" / "_shards").exists()  # not complete: a rerun reads it again


def test_the_skip_set_of_a_million_rows_takes_8_mb(tmp_path):
    """The driver's memory for resume: 8 bytes a written row, whatever the ids' length."""
    from pipelines.storage.files import read_done

    ids = [f"{n:012d}-{'x' * 20}" for n in range(1_000_000)]
    mark_done(str(tmp_path), ids, {})
    done, provenances = read_done(str(tmp_path))
    assert len(done) == 1_000_000 and done.hashes.nbytes == 8_000_000
    assert done.contains([ids[0], ids[-1], "not-written"]).tolist() == [True, True, False]
    assert list(provenances) == ['{"model": "test"}']
    assert np.all(np.diff(done.hashes.astype(np.float64)) >= 0)
