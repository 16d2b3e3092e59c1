"""Planning and resuming at corpus scale (benchmarks/scale.py's corpus and stub model): 20,000
images in SA-1B tar shards, a run killed in its last shard, then planned and resumed by the
job's own code. The million-row figures are the benchmark's (docs/scale.md)."""

import numpy as np
import pytest

from pipelines.automask.exports import write_batch
from pipelines.options import CorpusOptions
from pipelines.reading import plan_inputs, read_shards
from pipelines.sources import image_id_for, iter_shard
from pipelines.storage.errors import read_errors
from pipelines.storage.files import DoneIds, read_table

from .helpers import load_benchmark

ROWS, PER_SHARD, WRITTEN_OF_LAST = 20_000, 5_000, 4_800


def write_as_a_killed_run(scale, shards, output: str, last_rows: int) -> None:
    """What a run killed in the last shard leaves: the other shards read to their end (their
    manifests written) and their rows written, and `last_rows` rows of the last shard, through
    the job's shard reader and masks writer (the stub's output: no masks)."""
    for shard in shards:
        rows = []
        for batch in read_shards({"shard": np.array([str(shard)])}, output, DoneIds.of([])):
            n = len(batch["image_id"])
            batch = {**batch, "orig_h": np.full(n, 32), "orig_w": np.full(n, 32)}
            rows.append(scale.StubMasker()(batch))
            if shard == shards[-1] and 64 * len(rows) >= last_rows:
                break  # killed here: no manifest for this shard
        merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        take = slice(0, last_rows if shard == shards[-1] else None)
        write_batch({k: v[take] for k, v in merged.items()}, output, scale.PROVENANCE)


def test_a_run_killed_in_its_last_shard_is_planned_and_resumed_at_20k_rows(ray_local, tmp_path):
    scale = load_benchmark("scale")
    shards = scale.write_corpus(tmp_path / "corpus", ROWS, PER_SHARD)
    output = str(tmp_path / "out")
    write_as_a_killed_run(scale, shards, output, WRITTEN_OF_LAST)

    plan = plan_inputs(str(tmp_path / "corpus"), output, scale.PROVENANCE)
    assert plan.shards == [str(shards[-1])]  # the complete shards are not opened again
    assert plan.skipped == ROWS - PER_SHARD and len(plan.done) == ROWS - PER_SHARD + WRITTEN_OF_LAST

    corpus = CorpusOptions(output=output, input=str(tmp_path / "corpus"), batch_size=64, rows_per_file=512)
    resumed = scale.run(corpus)
    assert (resumed["written"], resumed["skipped"], resumed["failed"]) == (
        PER_SHARD - WRITTEN_OF_LAST,
        ROWS - PER_SHARD + WRITTEN_OF_LAST,
        0,
    ), resumed
    ids = read_table(output, columns=["image_id"])["image_id"].to_pylist()
    assert len(ids) == ROWS and set(ids) == {str(n) for n in range(1, ROWS + 1)}
    assert not plan_inputs(str(tmp_path / "corpus"), output, scale.PROVENANCE).shards  # nothing left


def test_a_parquet_manifest_is_read_by_ray_data_and_resumed(ray_local, tmp_path, capsys):
    """A manifest of files (its own ids for some rows) is planned without listing it: the plan
    holds no file list; the run writes every readable file, reports the missing one by its
    source, and a rerun skips the written ones and tries the missing one again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scale = load_benchmark("scale")
    folder = tmp_path / "files"
    folder.mkdir()
    jpeg = next(m.data for m in iter_shard(str(scale.write_corpus(tmp_path / "corpus", 1, 1)[0])))
    sources = []
    for n in range(120):
        (folder / f"img_{n:04d}.jpg").write_bytes(jpeg)
        sources.append(str(folder / f"img_{n:04d}.jpg"))
    sources.append(str(folder / "missing.jpg"))
    ids = [f"mine-{n}" if n % 2 else None for n in range(len(sources))]
    pq.write_table(pa.table({"source": sources, "image_id": pa.array(ids, pa.string())}), tmp_path / "list.parquet")
    output = str(tmp_path / "out")
    corpus = CorpusOptions(output=output, input=str(tmp_path / "list.parquet"), batch_size=32, rows_per_file=32)

    plan = plan_inputs(corpus.input, output, scale.PROVENANCE)
    assert plan.manifest == corpus.input and not plan.files and not plan.shards
    first = scale.run(corpus)
    assert (first["written"], first["failed"], first["skipped"]) == (120, 1, 0), first
    written = read_table(output, columns=["image_id", "source"]).to_pydict()
    expected = {(i or image_id_for(s)): s for s, i in zip(sources[:120], ids)}
    assert dict(zip(written["image_id"], written["source"])) == expected  # the manifest's own ids kept
    assert read_errors(output)["source"].to_pylist() == [sources[-1]]

    again = scale.run(corpus)
    assert (again["written"], again["failed"], again["skipped"]) == (0, 1, 120), again
    assert len(read_table(output, columns=["image_id"])) == 120

    limited = plan_inputs(corpus.input, str(tmp_path / "out2"), scale.PROVENANCE, limit=5)
    assert [r.source for r in limited.files] == sources[:5] and limited.manifest is None


def test_a_manifest_without_sources_is_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "list.parquet")
    with pytest.raises(ValueError, match=r"list.parquet: a manifest needs a 'source' column"):
        plan_inputs(str(tmp_path / "list.parquet"), str(tmp_path / "out"), {})
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet manifest"):
        plan_inputs(str(tmp_path / "bad.parquet"), str(tmp_path / "out"), {})
