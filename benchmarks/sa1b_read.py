"""The jobs' shard read stage on SA-1B-sized shards, against a plain sequential read of each file.

    python benchmarks/sa1b_read.py                      # 1,000, 4,000 and 11,186 members (~5 GB of disk)
    python benchmarks/sa1b_read.py --members 200 1000   # quicker

For each size it writes a synthetic SA-1B-like shard (JPEGs of 1500x2250, a few hundred KB each,
and SA-1B JSONs of 100 masks; `tinysam.sample_data.write_synthetic_sa1b_shard`), then times, side
by side:
- `cat shard > /dev/null`, the plain sequential read (before and after the others: the first also
  brings the file into the page cache, so that every reader reads from memory alike);
- the read generator in this process (`pipelines.reading.read_shards`: every member's bytes and
  JSON, as the jobs emit them);
- the jobs' read stage on Ray Data (one task streaming the shard, its blocks consumed by the driver).
It reports MB/s and ms per image, the read stage's fraction of the plain read, and ms per image
largest over smallest shard (flat: the cost of an image does not grow with its shard). Files are
removed at the end.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pipelines.reading import read_shards  # noqa: E402
from pipelines.storage.files import DoneIds  # noqa: E402
from tinysam.sample_data import write_synthetic_sa1b_shard  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def plain_read(path: Path) -> float:
    return timed(lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True))[0]


def in_process(path: Path, out: Path) -> int:
    batch = {"shard": [str(path)]}
    return sum(len(b["image_id"]) for b in read_shards(batch, output=str(out), done=DoneIds.of([])))


def ray_stage(path: Path, out: Path) -> int:
    import ray

    ds = ray.data.from_items([{"shard": str(path)}]).map_batches(
        read_shards, batch_size=1, num_cpus=0.5, fn_kwargs={"output": str(out), "done": DoneIds.of([])})
    return sum(len(b["image_id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, nargs="+", default=[1000, 4000, 11186])
    p.add_argument("--folder", help="where to write the shards (default: a temporary folder)")
    args = p.parse_args()

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="sa1b-read-", dir=args.folder))
    rows = []
    try:
        for n in args.members:
            shard = write_synthetic_sa1b_shard(root / f"sa_{n:06d}.tar", n)
            size = shard.stat().st_size
            cat_before = plain_read(shard)
            local_s, local_n = timed(lambda: in_process(shard, root / "out-local"))
            stage_s, stage_n = timed(lambda: ray_stage(shard, root / "out-ray"))
            cat_after = plain_read(shard)
            assert local_n == stage_n == n, (local_n, stage_n, n)
            cat_s = min(cat_before, cat_after)
            rows.append((n, size, cat_s, local_s, stage_s))
            print(f"{n} members, {size / 2**20:.0f} MiB: cat {size / 2**20 / cat_s:.0f} MB/s, "
                  f"in process {size / 2**20 / local_s:.0f} MB/s, Ray Data stage {size / 2**20 / stage_s:.0f} MB/s",
                  flush=True)
            shard.unlink()
            shutil.rmtree(root / "out-local", ignore_errors=True)
            shutil.rmtree(root / "out-ray", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    print("\n| members | shard MiB | cat MB/s | read stage MB/s | stage / cat | in process MB/s | ms per image (stage) |")
    print("|---|---|---|---|---|---|---|")
    for n, size, cat_s, local_s, stage_s in rows:
        mib = size / 2**20
        print(f"| {n} | {mib:.0f} | {mib / cat_s:.0f} | {mib / stage_s:.0f} | {cat_s / stage_s:.2f} | "
              f"{mib / local_s:.0f} | {stage_s / n * 1000:.2f} |")
    per_image = [stage_s / n for n, _, _, _, stage_s in rows]
    print(f"\nms per image, largest shard over smallest: {per_image[-1] / per_image[0]:.2f} (goal <= 1.2); "
          f"read stage / plain read: {min(c / s for _, _, c, _, s in rows):.2f} at worst (goal >= 0.5)")


if __name__ == "__main__":
    main()
