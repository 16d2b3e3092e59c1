"""The jobs' shard read stage on SA-1B-sized shards, against a plain sequential read of each file.

    python benchmarks/sa1b_read.py                      # 1,000, 4,000 and 11,186 members (~5 GB of disk)
    python benchmarks/sa1b_read.py --members 200 1000   # quicker

For each size it writes a synthetic SA-1B-like shard (JPEGs of 1500x2250, a few hundred KB each,
and SA-1B JSONs of 100 masks; `tinysam_samples.write_synthetic_sa1b_shard`), then times, side
by side:
- `cat shard > /dev/null`, the plain sequential read (before and after the others: the first also
  brings the file into the page cache, so that every reader reads from memory alike);
- the read generator in this process (`pipelines.reading.read_shards`: every member's bytes and
  JSON, as the jobs emit them);
- the jobs' read stage on Ray Data (one task streaming the shard, its blocks consumed by the driver).
Each is timed cold (the file evicted from the page cache first, with posix_fadvise: SA-1B shards
are read once, from disk or S3, not from memory) and warm (from the page cache: the parser's own
cost). It reports MB/s and ms per image, the read stage's fraction of the plain read, and ms per
image largest over smallest shard (flat: the cost of an image does not grow with its shard).
Files are removed at the end.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from _harness import benchmark_parser  # benchmarks/ is on sys.path

from pipelines.reading import read_shards  # noqa: E402
from pipelines.storage.files import DoneIds  # noqa: E402
from tinysam_samples import write_synthetic_sa1b_shard  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages: no privilege needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(path: Path) -> float:
    return timed(lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True))[0]


def cold(path: Path, fn):
    evict(path)
    return timed(fn)


def in_process(path: Path, out: Path) -> int:
    batch = {"shard": [str(path)]}
    return sum(len(b["image_id"]) for b in read_shards(batch, output=str(out), done=DoneIds.of([])))


def ray_stage(path: Path, out: Path) -> int:
    import ray

    ds = ray.data.from_items([{"shard": str(path)}]).map_batches(
        read_shards, batch_size=1, num_cpus=0.5, fn_kwargs={"output": str(out), "done": DoneIds.of([])}
    )
    return sum(len(b["image_id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def main() -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--members", type=int, nargs="+", default=[1000, 4000, 11186])
    p.add_argument("--folder", help="where to write the shards (default: a temporary folder)")
    args = p.parse_args()
    if args.smoke:
        args.members = [8]

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="sa1b-read-", dir=args.folder))
    # Ray's workers started and the reader imported before any timing: a job pays that once, not per shard
    ray_stage(write_synthetic_sa1b_shard(root / "warm-up.tar", 2), root / "warm-up")
    rows = []
    try:
        for n in args.members:
            shard = write_synthetic_sa1b_shard(root / f"sa_{n:06d}.tar", n)
            size = shard.stat().st_size
            out = root / "out"
            cat_cold, _ = cold(shard, lambda: plain_read(shard))
            stage_cold, stage_n = cold(shard, lambda: ray_stage(shard, out))
            local_cold, local_n = cold(shard, lambda: in_process(shard, out))
            cat_warm = plain_read(shard)
            stage_warm, _ = timed(lambda: ray_stage(shard, out))
            local_warm, _ = timed(lambda: in_process(shard, out))
            assert local_n == stage_n == n, (local_n, stage_n, n)
            row = {
                "n": n,
                "mib": size / 2**20,
                "cat_cold": cat_cold,
                "stage_cold": stage_cold,
                "local_cold": local_cold,
                "cat_warm": cat_warm,
                "stage_warm": stage_warm,
                "local_warm": local_warm,
            }
            rows.append(row)
            print({k: round(v, 3) for k, v in row.items()}, flush=True)
            shard.unlink()
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    print(
        "\n| members | shard MiB | cold: cat MB/s | cold: read stage MB/s | stage / cat | cold: ms per image "
        "| warm: cat MB/s | warm: read stage MB/s | warm: in process MB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = r["mib"]
        print(
            f"| {r['n']} | {mib:.0f} | {mib / r['cat_cold']:.0f} | {mib / r['stage_cold']:.0f} | "
            f"{r['cat_cold'] / r['stage_cold']:.2f} | {r['stage_cold'] / r['n'] * 1000:.2f} | "
            f"{mib / r['cat_warm']:.0f} | {mib / r['stage_warm']:.0f} | {mib / r['local_warm']:.0f} |"
        )
    per_image = [r["stage_cold"] / r["n"] for r in rows]
    print(
        f"\nms per image (cold read stage), largest shard over smallest: {per_image[-1] / per_image[0]:.2f} "
        f"(goal <= 1.2); read stage / plain read, cold: {min(r['cat_cold'] / r['stage_cold'] for r in rows):.2f} "
        "at worst (goal >= 0.5)"
    )


if __name__ == "__main__":
    main()
