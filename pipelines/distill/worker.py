"""One Ray Train worker of the distillation job: a train loop of small named steps (build, restore,
batches, step, evaluate, checkpoint, log), as in Ray's own Train examples.

Rank 0 evaluates, keeps the run's history and writes the checkpoints; every rank steps, and every
rank recomputes its BatchNorm statistics before a checkpoint (they are part of the saved model).
"""

import json
import os
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import ray.train
import ray.train.torch
import torch

from tinysam import build_sam
from tinysam.distill import DistillConfig, Distiller, init_student_decoder
from tinysam.distill.distiller import match_embedding_statistics

from ..runtime import HUGE_PAGES_ENV

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
LOSS_TERMS = ("embedding", "token", "output", "focal", "dice", "iou")


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """Build teacher and student, resume from the last checkpoint if there is one, step through this
    worker's shard, report metrics every step and a checkpoint every `checkpoint_every` steps."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    if rank == 0:
        print(
            f"worker 0 of {world}: {device}, {config['threads']} threads, "
            f"{HUGE_PAGES_ENV}={os.environ.get(HUGE_PAGES_ENV)}",
            flush=True,
        )
    checkpoint = ray.train.get_checkpoint()
    distiller = build(config, device, fresh=checkpoint is None)
    history = restore(distiller, checkpoint, device)
    val_shard = ray.train.get_dataset_shard("val")

    def evaluate() -> float:
        batches = val_shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy")
        return distiller.evaluate(batches, config["eval_points"])["miou_vs_teacher"]

    for epoch, batch, waited in batches(ray.train.get_dataset_shard("train"), distiller, config):
        if distiller.step == 0 and rank == 0:
            # The untrained student, judged as every checkpoint is: BatchNorm statistics of a
            # training batch (precise BN), not a fresh model's running averages.
            distiller.recompute_bn_statistics(batch)
            history.append({"step": 0, "miou_vs_teacher": evaluate()})
        metrics = step(distiller, batch, epoch, waited, world)
        save = distiller.step % config["checkpoint_every"] == 0 or distiller.step == config["total_steps"]
        if save:
            distiller.recompute_bn_statistics(batch)
        if save and rank == 0:
            metrics["miou_vs_teacher"] = evaluate()
        if rank == 0:
            history.append(metrics)
        # the local copy is deleted once uploaded: a run keeps thousands of checkpoints' worth of
        # steps, and each copy left in the node's /tmp would stay there (~75 MB for vit_t_mini)
        checkpoint = save_checkpoint(distiller, history) if save and rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
        if rank == 0:
            log(metrics, config["total_steps"])


def build(config: Dict[str, Any], device: torch.device, fresh: bool) -> Distiller:
    """Teacher, student and optimiser. A student from scratch takes the teacher's prompt encoder and
    decoder, and (on a fresh run) starts at the teacher's embedding scale."""
    teacher = build_sam(config["teacher"], config["teacher_checkpoint"])
    student = build_sam(config["student"], config["student_checkpoint"])
    if not config["student_checkpoint"]:
        init_student_decoder(student, teacher)
        if fresh:
            match_embedding_statistics(student, torch.from_numpy(config["start_embedding"]))
    return Distiller(
        student,
        teacher,
        DistillConfig.from_dict(config["distill"]),
        config["total_steps"],
        device,
        wrap=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True}),
    )


def restore(distiller: Distiller, checkpoint: Optional[ray.train.Checkpoint], device: torch.device) -> List[dict]:
    """The distiller's state and the run's history from `checkpoint` (an empty history without one)."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as folder:
        distiller.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), map_location=device, weights_only=True))
        with open(os.path.join(folder, HISTORY_FILE)) as f:
            history = json.load(f)
    return history + [{"event": "resumed", "step": distiller.step}]


def batches(shard, distiller: Distiller, config: Dict[str, Any]) -> Iterator[Tuple[int, Dict[str, Any], float]]:
    """(epoch, batch, seconds waited for it) until the last step. Each epoch reshuffles with its own
    seed; a run resumed mid-epoch passes over the batches its checkpoint has seen."""
    per_epoch, total, size = config["steps_per_epoch"], config["total_steps"], config["batch_size"]
    last = time.perf_counter()
    while distiller.step < total:
        epoch, skip = divmod(distiller.step, per_epoch)
        for k, batch in enumerate(
            shard.iter_batches(
                batch_size=size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=4 * size,
                local_shuffle_seed=config["seed"] + epoch,
            )
        ):
            if k >= per_epoch or distiller.step >= total:
                break
            if k >= skip:
                yield epoch, batch, time.perf_counter() - last
            last = time.perf_counter()


def step(distiller: Distiller, batch: Dict[str, Any], epoch: int, waited: float, world: int) -> Dict[str, Any]:
    """One optimiser step; its metrics, with the images of every worker counted."""
    metrics = distiller.train_step(batch)
    metrics["images"] *= world
    metrics.update(
        epoch=epoch,
        step=distiller.step,
        data_wait_seconds=waited,
        images_per_second=metrics["images"] / (metrics["step_seconds"] + waited),
    )
    return metrics


def save_checkpoint(distiller: Distiller, history: List[dict]) -> ray.train.Checkpoint:
    """The distiller's state and the run's history, as a checkpoint Ray Train uploads."""
    folder = tempfile.mkdtemp(prefix="tinysam-ckpt-")
    torch.save(distiller.state_dict(), os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, HISTORY_FILE), "w") as f:
        json.dump(history, f)
    return ray.train.Checkpoint.from_directory(folder)


def log(metrics: Dict[str, Any], total: int) -> None:
    line = f"step {metrics['step']}/{total} loss {metrics['loss']:.4f} "
    line += " ".join(f"{k} {metrics[k]:.4f}" for k in LOSS_TERMS) + f" {metrics['images_per_second']:.2f} img/s"
    if "miou_vs_teacher" in metrics:
        line += f" mIoU(student, teacher) {metrics['miou_vs_teacher']:.4f}"
    print(line, flush=True)
