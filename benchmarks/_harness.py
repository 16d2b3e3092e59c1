"""What the benchmarks share: their parser with --smoke (`tests/test_benchmarks.py` runs each benchmark
with it), and the figures they derive from a job's summary."""

import argparse


def benchmark_parser(doc: str, smoke: bool = True) -> argparse.ArgumentParser:
    """A benchmark's parser: the first line of its docstring, and --smoke (the benchmark at toy
    sizes in seconds, only to show that it still runs)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if smoke:
        parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds: only that it runs (tests run it)")
    return parser


def steady_images_per_second(summary) -> float:
    """A job summary's rate after its first results came back: what a long run approaches,
    start-up (actors started, models built) aside."""
    rows = summary.written + summary.failed - summary.first_result_rows
    seconds = summary.seconds - summary.first_result_seconds
    return rows / seconds if rows > 0 and seconds > 0 else 0.0


def coco_rle_generator(sam, config):
    """The everything-mode generator `config` describes, giving the COCO RLE records the
    auto-masking job's actors store."""
    return config.generator(sam, output_mode="coco_rle")
