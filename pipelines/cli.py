"""The jobs' command lines: every job's parser comes from `job_parser`, and the flags several jobs
share are declared here by name (`--checkpoint`, the corpus flags, the everything-mode flags).

Exit status of every corpus job: 0 all written, 1 some images failed, 2 stopped early
(--max-failures) or refused before any work (bad arguments, checkpoint, input or output).
"""

import argparse
import dataclasses
import functools
import json
import sys
from typing import Callable, Optional

from tinysam.everything.config import DECODER_DTYPES, GPU_EXECUTION, MODES, PRESETS, EverythingConfig
from tinysam.weights import CheckpointError

from .options import CorpusOptions
from .reading import DEFAULT_MAX_MEGAPIXELS
from .results import JobSummary, TooManyFailures

EVERYTHING_FIELDS = {f.name: f for f in dataclasses.fields(EverythingConfig)}

EXIT_CODES = """exit status:
  0  every image written (or already present)
  1  some images failed: they are in <output>/_errors, the rest is written
  2  refused before any work (bad arguments, checkpoint, input or output, an output made with
     other settings), or stopped early (--max-failures)"""


def job_parser(doc: str, exit_codes: Optional[str] = EXIT_CODES) -> argparse.ArgumentParser:
    """A job's parser: its docstring as description, its exit codes in --help (a job that is not a
    corpus job says its own in its docstring), no abbreviated flags."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=exit_codes, allow_abbrev=False
    )


def checkpoint_arg(text: str) -> Optional[str]:
    """A checkpoint flag's value: a name, path or URL; "none" (any case) asks for random weights
    explicitly (tests)."""
    return None if text.lower() == "none" else text


def add_checkpoint_argument(p, help_extra: str = "", **kwargs) -> None:
    """--checkpoint, required in every job that loads a model (README): a known name, path or URL,
    or 'none' for random weights. `kwargs` go to argparse (e.g. action="append")."""
    kwargs.setdefault("required", True)
    p.add_argument(
        "--checkpoint",
        type=checkpoint_arg,
        help="known name (e.g. mobile_sam), path, http(s):// or s3:// URL; 'none' for random weights" + help_extra,
        **kwargs,
    )


INPUT_HELP = (
    "folder, s3:// prefix, .txt list of paths/URLs, .parquet manifest (a 'source' column of paths/URLs, "
    "optionally 'image_id'; read in parallel: for millions of files), or SA-1B .tar shard(s)"
)


def add_corpus_arguments(p: argparse.ArgumentParser, batch_size: int) -> None:
    """--output, --checkpoint, batching, actors, limits: the same in every job."""
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the Parquet files")
    add_checkpoint_argument(p)
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per actor call")
    p.add_argument("--concurrency", type=int, default=1, help="model actors")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=int, default=1, help="CPUs (and torch threads on CPU) per actor")
    p.add_argument("--limit", type=int, help="only N images: files in sorted order, then shard members")
    p.add_argument("--max-failures", type=int, help="stop once more than N images failed")
    p.add_argument("--rows-per-file", type=int, help="rows per Parquet file (default: files of ~128 MiB)")
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_MEGAPIXELS,
        help=f"larger images are reported, not decoded (default {DEFAULT_MAX_MEGAPIXELS:g})",
    )
    p.add_argument(
        "--actor-memory-gb",
        type=float,
        help="memory an actor may allocate beyond its model (default: no cap); an image that needs "
        "more is reported alone instead of the system killing the actor",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo the rows of an output made with another model or settings (default: refuse)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored when joining a cluster)")


def corpus_options(args: argparse.Namespace) -> CorpusOptions:
    """The `CorpusOptions` of the flags `add_corpus_arguments` declared (and the job's --input)."""
    return CorpusOptions(
        output=args.output,
        input=getattr(args, "input", None),
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.num_gpus_per_actor,
        num_cpus_per_actor=args.num_cpus_per_actor,
        limit=args.limit,
        max_failures=args.max_failures,
        rows_per_file=args.rows_per_file,
        max_megapixels=args.max_megapixels,
        overwrite=args.overwrite,
        actor_memory_gb=args.actor_memory_gb,
    )


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_everything_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `EverythingConfig` field, each named below; its help text and default are the
    field's own (tinysam/everything/config.py). Unset flags stay None: the config's defaults apply,
    and dense mode can tell a hierarchical-only flag that was given from one that was not."""
    g = p.add_argument_group("everything mode (tinysam/everything/config.py)")
    g.add_argument(
        "--preset",
        dest="everything_preset",
        choices=PRESETS,
        help="named settings that the flags below override: quality (dense, the official masks), balanced "
        "(the defaults), fast (the paper's hierarchical rule); speed and agreement in docs/benchmarks.md",
    )
    setting = functools.partial(_everything_flag, g)
    setting("--mode", str, choices=MODES)
    setting("--points-per-side", int)
    setting("--round1-points-per-side", int)
    setting("--high-confidence-thresh", float)
    setting("--skip-margin", float)
    setting("--skip-similarity", float)
    setting("--points-per-batch", int)
    setting("--pred-iou-thresh", float)
    setting("--stability-score-thresh", float)
    setting("--stability-score-offset", float)
    setting("--box-nms-thresh", float)
    setting("--crop-n-layers", int)
    setting("--crop-nms-thresh", float)
    setting("--crop-overlap-ratio", float)
    setting("--crop-n-points-downscale-factor", int)
    setting("--min-mask-region-area", int)
    setting("--upsample-chunk", int)
    setting("--decoder-chunk", int)
    setting("--fast-decoder", _bool, metavar="BOOL")
    setting("--decoder-dtype", str, choices=DECODER_DTYPES)
    setting("--low-res-decisions", _bool, metavar="BOOL")


def _everything_flag(group, flag: str, kind: Callable, **extra) -> None:
    """Declare `flag` for the `EverythingConfig` field of the same name, with that field's help."""
    name = flag[2:].replace("-", "_")
    field = EVERYTHING_FIELDS[name]  # KeyError: a flag for a setting the config does not have
    shown = f"{field.default:g}" if isinstance(field.default, float) else field.default
    default = "" if field.default is None else f" (default {shown})"
    if "choices" not in extra:
        extra.setdefault("metavar", kind.__name__.upper())
    group.add_argument(
        flag, dest=f"everything_{name}", type=kind, default=None, help=field.metadata["help"] + default, **extra
    )


def everything_config(args: argparse.Namespace, gpu: bool = False) -> EverythingConfig:
    """The `EverythingConfig` of the flags `add_everything_arguments` declared (ValueError if
    invalid). With `gpu`, the execution settings not given take their GPU values (`GPU_EXECUTION`)."""
    prefix = "everything_"
    given = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
    if gpu:
        given = {**GPU_EXECUTION, **given}
    return EverythingConfig.from_preset(given.pop("preset", None), **given)


def run_job(run: Callable[[], JobSummary], report: Callable[[JobSummary], None]) -> int:
    """Run a pipeline, print its summary (and a machine-readable SUMMARY line), return the exit status."""
    try:
        summary = run()
    except (CheckpointError, FileNotFoundError, PermissionError, ValueError, KeyError, TooManyFailures) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summary
    print(f"images {s.images}: written {s.written}, already present {s.skipped}, failed {s.failed}")
    if s.unsupported:
        print(f"unsupported files (not images or .tar shards), not read: {len(s.unsupported)}")
        for source in s.unsupported[:20]:
            print(f"  unsupported: {source}")
    report(s)
    for source in s.failures:
        print(f"  failed: {source}")
    print("SUMMARY " + json.dumps(s.as_dict()))
    return 1 if s.failed else 0
