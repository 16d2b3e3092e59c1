"""`ray job submit` of the precompute job against a Ray head started by the tests. The jobs are
thin entry points over the same `pipelines.cli` runner and `sys.path` set-up, so one submitted job
shows that a submitted working dir runs; the other jobs' work is tested in-process."""

from .helpers import flags, submit_job


def test_precompute_job_submitted_to_a_local_head(ray_head, tmp_path, photos_dir, mobile_sam_path):
    from pipelines.storage.files import read_table

    out = tmp_path / "emb"
    args = flags(input=photos_dir, output=out, teacher="vit_t", checkpoint=mobile_sam_path, batch_size=2)
    done = submit_job(ray_head, ["python", "jobs/precompute_embeddings.py", *args])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "written 3" in done.stdout
    assert read_table(str(out)).num_rows == 3
