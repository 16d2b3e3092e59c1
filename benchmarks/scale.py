"""A dry run of the auto-masking job's pipeline at corpus scale: what Ray and our storage cost per
image when the model costs nothing, and how planning a resume grows with what is written.

The corpus: `--rows` tiny JPEGs (32x32) in SA-1B tar shards of `--rows-per-shard` (SA-1B: ~1,000
shards of ~11,000), on local disk; or, with `--manifest`, as files named by a Parquet manifest.
The pipeline is the job's own, piece by piece (plan_inputs, the read and decode tasks, the actor
pool, the masks writer, finish_summary), with a stub model actor in place of the generator: it
returns no masks and costs ~0 per image. What it prints:

  time to the first row      job start (listing and planning included) to the first written row
  per-row overhead           the run's seconds per image, and after the first row (steady); and
                             what the decode tasks' own work (decode, resize to 1024 px, pad) costs
                             a row, alone in this process: the rest is Ray's and the writer's
  driver peak                the driver process's peak RSS over the run
  object-store peak          sampled every second over the run (and bytes spilled)
  resume planning            plan_inputs on the output with 10% and 90% of the rows written (a
                             fresh process each: time and its peak RSS), then the resume of the
                             90% case run to the end: exactly one row per image
  file lists                 plan_inputs over a .txt list of --rows image paths (never read):
                             the driver-side listing that file inputs pay

    python benchmarks/scale.py --rows 1000000 [--rows-per-shard 10000] [--batch-size 64] [--manifest]

The last line is a JSON object: rows, per_row_ms, steady_per_row_ms, first_row_s,
driver_peak_mib, object_store_peak_mib, resume_plan_s (90% written), resume_plan_mib, and the
10% figures.
"""

import io
import json
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from _harness import benchmark_parser  # benchmarks/ is on sys.path
from PIL import Image

from pipelines.automask.exports import write_batch
from pipelines.automask.worker import PASSED_THROUGH
from pipelines.options import CorpusOptions
from pipelines.reading import plan_inputs, prepare_images, read_shards
from pipelines.results import JobSummary, finish_summary, run_to_output
from pipelines.runtime import init_ray
from pipelines.stages import ModelStage, image_pipeline, ok_rows
from pipelines.storage.files import DoneIds, read_table

REPO = Path(__file__).resolve().parents[1]
PROVENANCE = {"model": "stub", "checkpoint_sha256": "none", "mode": "stub", "params": "{}"}
DOCUMENT = b'{"image": {}, "annotations": []}'  # each member's SA-1B JSON: no masks


class StubMasker:
    """The auto-masking actor's output (no masks) at ~0 cost: what is left is the pipeline's."""

    def __init__(self, cpu_threads: Any = None) -> None:
        pass

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        ok = ok_rows(batch)
        out = {k: v for k, v in batch.items() if k in PASSED_THROUGH}
        n = len(ok)
        out.update(
            error=batch["error"],
            masks=np.where(ok, "[]", "").astype(object),
            encode_seconds=np.zeros(n),
            generate_seconds=np.zeros(n),
        )
        return out


def write_corpus(folder: Path, rows: int, per_shard: int) -> List[Path]:
    """`rows` members `sa_<n>.jpg` (one tiny JPEG's bytes, each with its SA-1B JSON) in tar shards."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, first in enumerate(range(0, rows, per_shard)):
        path = folder / f"sa_{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for n in range(first + 1, min(rows, first + per_shard) + 1):
                for name, payload in ((f"sa_{n}.jpg", jpeg), (f"sa_{n}.json", DOCUMENT)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(path)
    return shards


def write_manifest_corpus(folder: Path, rows: int) -> Path:
    """`rows` tiny JPEG files and a Parquet manifest naming them (`source`): the manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buf, "JPEG")
    sources = []
    for n in range(rows):
        path = folder / f"img_{n:08d}.jpg"
        path.write_bytes(buf.getvalue())
        sources.append(str(path))
    pq.write_table(pa.table({"source": sources}), folder.parent / "manifest.parquet")
    return folder.parent / "manifest.parquet"


class ObjectStoreSampler:
    """The cluster's object-store bytes in use, every `every` seconds (Ray's own memory report)."""

    def __init__(self, every: float = 1.0) -> None:
        self.peak = self.spilled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while not self._stop.wait(every):
            try:
                stats = get_memory_info_reply(state, timeout_seconds=10).store_stats
            except Exception:  # a busy raylet: the next sample
                continue
            self.peak = max(self.peak, stats.object_store_bytes_used)
            self.spilled = max(self.spilled, stats.spilled_bytes_total)

    def __enter__(self) -> "ObjectStoreSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(corpus: CorpusOptions) -> Dict[str, Any]:
    """The job's pipeline with the stub actor, from planning to the summary."""
    start = time.perf_counter()
    plan = plan_inputs(corpus.input, corpus.output, PROVENANCE, storage_options=corpus.storage_options)
    planned = time.perf_counter() - start
    stage = ModelStage(
        StubMasker, {}, write_batch, {"output": corpus.output, "provenance": PROVENANCE}, corpus.rows_per_file
    )
    summary = JobSummary()
    with ObjectStoreSampler() as store:
        run_to_output(image_pipeline(plan, stage, corpus), summary, corpus.output)
    finish_summary(summary, plan, corpus.output)
    seconds = time.perf_counter() - start
    rows = summary.written + summary.failed
    steady_rows = rows - summary.first_result_rows
    return {
        "rows": rows,
        "written": summary.written,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "plan_s": planned,
        "first_row_s": planned + summary.first_result_seconds,
        "seconds": seconds,
        "per_row_ms": 1000 * seconds / max(1, rows),
        "steady_per_row_ms": 1000 * (summary.seconds - summary.first_result_seconds) / max(1, steady_rows),
        "object_store_peak_mib": store.peak / 2**20,
        "spilled_mib": store.spilled / 2**20,
    }


# plan_inputs in a fresh process that imports only what the job's driver needs to plan: its
# time, its peak RSS less the imports' (`base_mib`), and what it found to do
TIMED_PLAN = """
import json, sys, time
from pipelines.reading import plan_inputs
from tinysam.utils.rss import peak_rss_bytes
def peak():  # this process's own peak, MiB (ru_maxrss carries the forking parent's over exec)
    return peak_rss_bytes() / 2**20
base = peak()
start = time.perf_counter()
plan = plan_inputs(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": peak(), "base_mib": base, "done": len(plan.done),
    "files": len(plan.files), "shards": len(plan.shards), "skipped": plan.skipped}))
"""


def plan_in_child(input: str, output: str) -> Dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", TIMED_PLAN, input, output, json.dumps(PROVENANCE)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"planning {input} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_ms_per_row(shard: Path, output: str) -> float:
    """What the decode tasks do to each image (decode, resize to the model's 1024 px, pad), one
    batch of the shard in this process: the least of three tries, ms a row."""
    batch = next(read_shards({"shard": np.array([str(shard)])}, output, DoneIds.of([])))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        prepare_images(batch)
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / len(batch["image_id"])


def keep_share(output: Path, aside: Path, share: float) -> int:
    """Move the output's Parquet files but the first `share` of them aside (a run stopped
    there); returns the rows still in the output."""
    files = sorted(output.glob("part-*.parquet"))
    aside.mkdir(exist_ok=True)
    for f in files[int(round(share * len(files))) :]:
        f.rename(aside / f.name)
    return read_table(str(output), columns=["image_id"]).num_rows if any(output.glob("part-*.parquet")) else 0


def restore(output: Path, aside: Path) -> None:
    for f in aside.glob("*.parquet"):
        f.rename(output / f.name)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64, help="images per read, decode and actor call")
    parser.add_argument("--rows-per-file", type=int, default=4096, help="rows per output Parquet file")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray")
    parser.add_argument("--manifest", action="store_true", help="files named by a Parquet manifest instead of shards")
    parser.add_argument("--work", help="folder for the corpus and the output (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.rows_per_shard, args.rows_per_file = 300, 100, 50
    work = Path(args.work or tempfile.mkdtemp(prefix="tinysam-scale-"))
    try:
        started = time.perf_counter()
        if args.manifest:
            source = write_manifest_corpus(work / "files", args.rows)
            layout = "files listed in a Parquet manifest"
        else:
            source = work / "corpus"
            layout = f"{len(write_corpus(source, args.rows, args.rows_per_shard))} shards"
        print(f"{args.rows} images, {layout}: {time.perf_counter() - started:.0f} s to write", flush=True)
        init_ray(num_cpus=args.num_cpus)
        corpus = CorpusOptions(
            output=str(work / "out"),
            input=str(source),
            batch_size=args.batch_size,
            rows_per_file=args.rows_per_file,
        )
        decode_ms = decode_ms_per_row(write_corpus(work / "probe", 64, 64)[0], str(work / "unused"))
        print(f"decoding, resizing and padding alone: {decode_ms:.3f} ms a row on one core", flush=True)
        first = run(corpus)
        driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"run: {first['rows']} rows in {first['seconds']:.0f} s: {first['per_row_ms']:.3f} ms a row "
            f"({first['steady_per_row_ms']:.3f} after the first), first row at {first['first_row_s']:.1f} s "
            f"(planning {first['plan_s']:.1f} s); driver peak {driver_peak:.0f} MiB, object store peak "
            f"{first['object_store_peak_mib']:.0f} MiB, spilled {first['spilled_mib']:.0f} MiB",
            flush=True,
        )
        out, aside = work / "out", work / "aside"
        plans = {}
        for share in (0.1, 0.9):
            written = keep_share(out, aside, share)
            plans[share] = {"written": written, **plan_in_child(corpus.input, corpus.output)}
            p = plans[share]
            print(
                f"resume planning with {written} rows written: {p['seconds']:.1f} s, peak {p['peak_mib']:.0f} MiB "
                f"({p['base_mib']:.0f} of it imports; {p['shards']} shards, {p['files']} listed files to read)",
                flush=True,
            )
            if share < 0.9:
                restore(out, aside)
        resumed = run(corpus)  # the 90% case to its end
        ids = read_table(str(out), columns=["image_id"])["image_id"]
        assert len(ids) == args.rows and len(set(ids.to_pylist())) == args.rows, (len(ids), args.rows)
        print(
            f"resume: {resumed['written']} rows written, {resumed['skipped']} skipped, in {resumed['seconds']:.0f} s; "
            f"the output holds each of the {args.rows} images once",
            flush=True,
        )
        listing = work / "list.txt"
        listing.write_text("".join(f"{work}/files/img_{n:08d}.jpg\n" for n in range(args.rows)))
        listed = plan_in_child(str(listing), str(work / "out_files"))
        print(
            f"a .txt list of {args.rows} files planned on the driver: {listed['seconds']:.1f} s, "
            f"peak {listed['peak_mib']:.0f} MiB ({listed['base_mib']:.0f} of it imports)"
        )
        result = {
            "rows": first["rows"],
            "per_row_ms": round(first["per_row_ms"], 4),
            "steady_per_row_ms": round(first["steady_per_row_ms"], 4),
            "decode_ms_per_row": round(decode_ms, 4),
            "first_row_s": round(first["first_row_s"], 2),
            "driver_peak_mib": round(driver_peak),
            "object_store_peak_mib": round(first["object_store_peak_mib"]),
            "spilled_mib": round(first["spilled_mib"]),
            "resume_plan_s": round(plans[0.9]["seconds"], 2),
            "resume_plan_mib": round(plans[0.9]["peak_mib"]),
            "resume_written": plans[0.9]["written"],
            "plan_at_10pct_s": round(plans[0.1]["seconds"], 2),
            "plan_at_10pct_mib": round(plans[0.1]["peak_mib"]),
            "resume_rows_s": round(resumed["seconds"], 1),
            "file_list_plan_s": round(listed["seconds"], 2),
            "file_list_plan_mib": round(listed["peak_mib"]),
        }
        print(json.dumps(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
