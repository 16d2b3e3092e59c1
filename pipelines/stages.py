"""The dataset every batch job (precompute, automask) builds, stage by stage.

  preflight        -> refuse a bad checkpoint or an unwritable output before any work
  image_pipeline   -> the read side (pipelines/reading.py), the model actors, the write tasks
  model_and_write  -> the actor pool (pipelines/actors.py) and the write tasks, retries bounded
Every stage takes the job's `CorpusOptions` (pipelines/options.py) whole, and `ModelStage` says
what differs between the jobs: their actor and their write task.
What a run adds up to (summary, lost images) is pipelines/results.py.

Module level imports stay light (numpy, PIL, pyarrow): Ray's decoding and writing workers import
this module, and on a small machine torch's import would compete with the model for the cores.
Torch and the models are imported where they are used.
"""

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np

from .options import CorpusOptions
from .reading import Plan, manifest_rows, prepare_images, read_shards, read_sources
from .results import IMAGE_ATTEMPTS
from .runtime import model_actor_env, on_one_thread
from .storage.files import ensure_writable


def preflight(model_type: str, checkpoint: Optional[str], output: str, storage_options: Optional[dict] = None) -> str:
    """Fail before any work on an unreadable checkpoint, one of the wrong model type, or an
    unwritable output; returns the checkpoint's SHA-256 ("random-init" without one) for provenance."""
    from tinysam.build_sam import check_checkpoint
    from tinysam.weights import resolve_checkpoint, sha256_file

    checkpoint_sha = sha256_file(resolve_checkpoint(checkpoint)) if checkpoint else "random-init"
    if checkpoint:
        check_checkpoint(model_type, checkpoint)
    ensure_writable(output, storage_options)
    return checkpoint_sha


@dataclass(frozen=True)
class ModelStage:
    """What differs between the corpus jobs after the read side: the model actor (`actor_cls` built
    with `actor_kwargs` once per actor) and the write task after it (`write_fn` with
    `write_kwargs`, `rows_per_file` rows a file)."""

    actor_cls: type
    actor_kwargs: Dict[str, Any]
    write_fn: Callable
    write_kwargs: Dict[str, Any]
    rows_per_file: int = 1


def image_pipeline(plan: Plan, stage: ModelStage, corpus: CorpusOptions, keep_original: bool = False):
    """plan -> `read_dataset` -> `model_and_write` (a lazy Dataset)."""
    return model_and_write(read_dataset(plan, corpus, keep_original), stage, corpus)


def read_dataset(plan: Plan, corpus: CorpusOptions, keep_original: bool = False):
    """The jobs' read side (a lazy Dataset of prepared rows): read tasks for the files (listed on
    the driver, or a manifest's rows read in parallel), one task per shard streaming it once,
    then decode tasks."""
    import ray

    from .sources import arrow_filesystem, check_manifest

    batch_size, storage_options = corpus.batch_size, corpus.storage_options
    parts, files = [], None
    if plan.files:
        items = [{"image_id": r.image_id, "source": r.source} for r in plan.files]
        files = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    if plan.manifest:  # the skip set goes to the tasks once, in the object store (Ray Data puts the stage there)
        path, fs = arrow_filesystem(plan.manifest, storage_options)
        columns = check_manifest(plan.manifest, storage_options)[1]
        listed = ray.data.read_parquet(path, filesystem=fs).select_columns(columns)  # pushed down into the read
        listed = listed.map_batches(manifest_rows, batch_size=4096, num_cpus=0.5, fn_kwargs={"done": plan.done})
        files = listed  # a plan reads a manifest or listed files, never both
    if files is not None:
        # reading waits on I/O: half a CPU, in its own tasks, ahead of the actors
        parts.append(
            files.map_batches(
                read_sources, batch_size=batch_size, num_cpus=0.5, fn_kwargs={"storage_options": storage_options}
            )
        )
    if plan.shards:
        shards = ray.data.from_items([{"shard": s} for s in plan.shards], override_num_blocks=len(plan.shards))
        read = shards.map_batches(
            read_shards,
            batch_size=1,
            num_cpus=0.5,
            fn_kwargs={"output": corpus.output, "done": plan.done, "storage_options": storage_options},
        )
        parts.append(read.limit(plan.limit) if plan.limit is not None else read)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        prepare_images,
        batch_size=batch_size,
        num_cpus=0.5,
        fn_kwargs={"max_megapixels": corpus.max_megapixels, "keep_original": keep_original},
    )


def model_and_write(ds, stage: ModelStage, corpus: CorpusOptions):
    """Prepared rows -> an actor pool of `stage.actor_cls` -> `stage.write_fn` tasks.

    A batch whose actor dies (out of memory, a crash) is retried on a restarted actor, at most
    IMAGE_ATTEMPTS times in all; then its block is dropped instead of the job stalling or failing,
    and `report_lost` names its images in the errors table."""

    ds.context.max_errored_blocks = -1  # this dataset's own context: lost blocks are reported as lost images
    retries = {"max_restarts": -1, "max_task_retries": IMAGE_ATTEMPTS - 1}
    with warnings.catch_warnings():  # Ray 2.60 takes task retries only as ray_remote_args (deprecated)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = model_actor_stage(ds, stage.actor_cls, stage.actor_kwargs, corpus, retries)
    return ds.map_batches(
        stage.write_fn,
        batch_size=stage.rows_per_file,
        num_cpus=0.5,
        fn_kwargs={**stage.write_kwargs, "storage_options": corpus.storage_options},
    )


def model_actor_stage(
    ds,
    actor_cls: type,
    actor_kwargs: Dict[str, Any],
    corpus: CorpusOptions,
    remote_args: Optional[Dict[str, Any]] = None,
):
    """`actor_cls` over `ds` on a pool of `corpus.concurrency` model actors, set up as every job's
    model actors are: one thread for the model (`runtime.on_one_thread`), the model actors' process
    environment (`runtime.model_actor_env`; a value in `remote_args`' runtime env wins), and on a
    CPU actor `cpu_threads` equal to its CPUs. `corpus` gives the batch size and the resources.

    One batch in flight per actor: a batch queued behind one that kills its actor dies with it,
    on every retry, and its innocent images would be reported lost with the poison one."""
    import ray

    options = dict(remote_args or {})
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**model_actor_env(), **runtime_env.get("env_vars", {})}
    options["runtime_env"] = runtime_env
    gpus, cpus = corpus.num_gpus_per_actor, corpus.num_cpus_per_actor
    return ds.map_batches(
        on_one_thread(actor_cls),
        batch_size=corpus.batch_size,
        compute=ray.data.ActorPoolStrategy(size=corpus.concurrency, max_tasks_in_flight_per_actor=1),
        num_gpus=gpus,
        num_cpus=cpus,
        fn_constructor_kwargs={**actor_kwargs, "cpu_threads": None if gpus else cpus},
        **options,
    )


def ok_rows(batch: Dict[str, np.ndarray]) -> np.ndarray:
    return np.array([not e for e in batch["error"]], dtype=bool)
