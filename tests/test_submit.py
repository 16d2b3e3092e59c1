"""`ray job submit` of the jobs against a Ray head started by the tests (one head for both, so
they live in one file: xdist runs a file in one worker)."""

from .conftest import submit_job


def test_precompute_job_submitted_to_a_local_head(ray_head, tmp_path, photos_dir, mobile_sam_path):
    from pipelines.parquet import read_table

    out = tmp_path / "emb"
    done = submit_job(ray_head, ["python", "jobs/precompute_embeddings.py", "--input", str(photos_dir),
                                 "--output", str(out), "--teacher", "vit_t", "--checkpoint", str(mobile_sam_path),
                                 "--batch-size", "2"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "written 3" in done.stdout
    assert read_table(str(out)).num_rows == 3


def test_automask_job_submitted_to_a_local_head(ray_head, tmp_path, photos_dir, mobile_sam_path):
    out = tmp_path / "masks"
    done = submit_job(ray_head, ["python", "jobs/automask.py", "--input", str(photos_dir), "--output", str(out),
                                 "--checkpoint", str(mobile_sam_path), "--points-per-side", "4",
                                 "--coco-json", str(out / "coco.json")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "written 3" in done.stdout and "masks " in done.stdout
    from pipelines.automask import iter_results

    assert len({r["image_id"] for r in iter_results(str(out))}) == 3 and (out / "coco.json").exists()
