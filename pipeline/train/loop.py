"""The training skeleton that cross-entropy training and SCST share: setup, one epoch, finish.

A *job* (``pipeline/train/run.py``'s ``XeJob``, ``pipeline/scst/run.py``'s ``ScstJob``) says
what a step computes; this module does the rest, once:

* **Global batches.** ``job.batch_size`` is the global batch (pairs for train,
  images for SCST). Each is cut into ``world_size × grad_accum`` equal
  micro-batches (rank *r* takes micro-batches *r·A … r·A+A−1*). Each micro-batch's
  summed loss is multiplied by ``world_size / job.global_count(batch)`` (DDP's
  averaging undoes the world size), so a step's gradient is that of the global
  batch's mean loss, whatever the number of processes.
* **DDP** under torchrun (gloo on the CPU, nccl on CUDA); rank 0 writes every file.
* **One mixed-precision path:** a ``GradScaler`` enabled for fp16 only (disabled,
  it passes everything through unchanged).
* **Divergence:** a non-finite step loss raises ``Diverged`` naming the step.
* **Progress:** one JSON-able record (``Progress``) of steps, curves, the best
  validation score; checkpoints (``pipeline/core/checkpoint.py``) every
  ``job.checkpoint_every`` steps and at each epoch end; resume from the newest one
  of the same identity; the best weights kept as ``best-<step>`` checkpoints.
* ``stop_after``: raise ``Stopped`` after that many steps, as a kill would (tests).
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch

from pipeline.core.checkpoint import Checkpoints, capture_rng, load_checkpoint, restore_rng
from pipeline.core.errors import CaplineError, ParamsError
from pipeline.core.runtime import Rank, all_reduce_sum, barrier, gather

log = logging.getLogger(__name__)
# Part of every identity: a checkpoint of an older Progress layout is skipped, not misread.
STATE_VERSION = 2


class Diverged(CaplineError):
    """The loss became inf or NaN; the message says at which step and what to change."""


class Stopped(Exception):
    """Raised after ``stop_after`` steps: a kill at a known point, for tests (checkpoints kept)."""


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint stores as JSON (the same on every rank)."""

    step: int = 0
    epoch: int = 1  # the epoch being trained
    position: int = 0  # the next batch of that epoch
    curve: list = field(default_factory=list)  # curve rows
    val_curve: list = field(default_factory=list)  # validation rows
    epoch_rows: list = field(default_factory=list)  # this epoch's per-step stats, summed over ranks
    best_step: Optional[int] = None
    best_score: Optional[float] = None
    evals_since_best: int = 0
    stopped_early: bool = False
    last_val: Optional[float] = None
    epoch_summary: Optional[float] = None  # ``job.epoch_summary`` of the last finished epoch


class Job(Protocol):
    """What a training job gives the loop (``XeJob``, ``ScstJob``)."""

    name: str  # "train" | "scst": the params section, in messages
    model: Any  # the ClipCaptioner trained
    modules: dict  # {name: module} whose weights checkpoints and best weights hold
    trainable: list  # parameters clipped and stepped
    optimizer: torch.optim.Optimizer
    schedule: Any  # an LR scheduler (LambdaLR of 1.0 for a constant rate)
    identity: dict  # what a checkpoint must match to be resumed (the loop adds world_size)
    amp: str  # resolved precision
    epochs: int
    batch_size: int  # the global batch
    batches_per_epoch: int
    grad_accum: int
    grad_clip: Optional[float]
    log_every: int
    eval_every: int  # steps between validations besides each epoch's end; 0: epoch ends only
    checkpoint_every: int
    patience: int  # validations without a new best before stopping; 0: never
    keep_best: bool  # the best-validating weights are the output (else the last)
    validate_first: bool  # validate the weights given before any step
    train_mode: bool  # module.train(mode) during the steps

    def epoch_batches(self, epoch: int) -> Sequence[np.ndarray]: ...  # the global batches, from (seed, epoch)
    def micro_batches(self, batch: np.ndarray, parts: int) -> list[np.ndarray]: ...
    def global_count(self, batch: np.ndarray) -> int: ...  # what the batch's mean loss divides by
    def micro_loss(self, net: torch.nn.Module, part: np.ndarray) -> tuple[torch.Tensor, Any]: ...  # (sum, stats)
    def step_row(self, stats: list) -> list[float]: ...  # the step's sums, loss first
    def postfix(self, row: list[float]) -> dict: ...
    def curve_row(self, progress: "Progress", rows: list, lr: Optional[float]) -> dict: ...
    def epoch_summary(self, rows: list) -> Optional[float]: ...
    def validate(self, progress: "Progress") -> tuple[Optional[float], Optional[dict]]: ...  # (score, row)
    def better(self, score: float, best: float) -> bool: ...
    def epoch_message(self, progress: "Progress") -> str: ...
    def write_curves(self, progress: "Progress") -> None: ...
    def finish(self, run: "Run", kept: str) -> dict: ...  # outputs (rank 0 writes); the metrics


@dataclass
class Run:
    """What ``start`` builds for the epochs: the job, the process, the optimisation state."""

    job: Job
    rank: Rank
    device: torch.device
    net: torch.nn.Module  # the model, or DDP around it
    scaler: torch.amp.GradScaler
    ckpts: Checkpoints
    progress: Progress
    window: list = field(default_factory=list)  # this process's per-step stats since the last curve row
    resumed_from: int = 0
    stop_after: Optional[int] = None
    bar: Any = None
    lr_used: Optional[float] = None
    # this process's timings and counts
    step_seconds: float = 0.0
    val_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    samples: int = 0

    @property
    def stateful(self) -> dict:
        return {"optimizer": self.job.optimizer, "schedule": self.job.schedule, "scaler": self.scaler}


# ------------------------------------------------------------------ the loop
def check_batch_size(name: str, batch_size: int, world_size: int, grad_accum: int = 1) -> None:
    """A global batch must cut into world_size x grad_accum equal micro-batches (checked before any loading)."""
    if batch_size % (world_size * grad_accum):
        accum = f" x {name}.grad_accum {grad_accum}" if name == "train" else ""
        raise ParamsError(f"{name}.batch_size: {batch_size} is not divisible by {world_size} process(es)"
                          f"{accum}; each micro-batch must have the same size")


def run_job(job: Job, rank: Rank, device: torch.device, checkpoint_dir, progress: bool,
            stop_after: Optional[int]) -> dict:
    """Train ``job`` to its end (or ``stop_after``) and return ``job.finish``'s metrics.

    ``checkpoint_dir`` None: a temporary folder (no resume), removed at the end.
    """
    temp = Path(tempfile.mkdtemp(prefix=f"capline-{job.name}-")) if checkpoint_dir is None else None
    try:
        run = start(job, rank, device, temp or Path(checkpoint_dir), progress, stop_after)
        try:
            while run.progress.epoch <= job.epochs and not run.progress.stopped_early:
                run_epoch(run)
            return finish(run)
        finally:
            run.bar.close()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def start(job: Job, rank: Rank, device: torch.device, checkpoint_dir: Path, progress: bool,
          stop_after: Optional[int]) -> Run:
    """DDP around the model, the scaler, the checkpoint folder, resume (or the first validation)."""
    from tqdm import tqdm

    net: torch.nn.Module = job.model
    if rank.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            job.model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    identity = {**job.identity, "world_size": rank.world_size, "state_version": STATE_VERSION}
    run = Run(job=job, rank=rank, device=device, net=net,
              scaler=torch.amp.GradScaler(device.type, enabled=job.amp == "fp16"),
              ckpts=Checkpoints(checkpoint_dir, identity, keep=2), progress=Progress(), stop_after=stop_after)
    if not resume(run) and job.validate_first:
        evaluate(run)  # the score of the weights given, before any step (SCST's epoch 0)
    total = job.batches_per_epoch * job.epochs
    run.bar = tqdm(total=total, initial=run.progress.step, desc=job.name, unit="step",
                   disable=not (progress and rank.is_main))
    return run


def resume(run: Run) -> bool:
    """Continue from the newest checkpoint of this run's identity; whether there was one."""
    found = run.ckpts.latest(quiet=not run.rank.is_main)
    steps = gather(found.step if found is not None else None)
    name = run.job.name
    if len(set(steps)) > 1:
        raise CaplineError(f"{name}: the processes see different checkpoints in {run.ckpts.root} "
                           f"(steps {steps}); is the folder shared by every node?")
    if found is None:
        if run.rank.is_main and (run.ckpts.steps() or run.ckpts.steps("best")):
            # One run's checkpoints per folder: those of another run (logged above) go.
            log.warning("%s: %s holds no checkpoint of this run; its contents are replaced", name, run.ckpts.root)
            run.ckpts.remove("step")
            run.ckpts.remove("best")
        barrier()
        return False
    state = found.restore(modules=run.job.modules, stateful=run.stateful)
    run.progress = Progress(**state["progress"])
    run.window = state["window"][run.rank.rank]
    restore_rng(found.rng[run.rank.rank])
    run.resumed_from = found.step
    if run.rank.is_main:
        # Best weights found after this checkpoint were never part of it; they come again.
        run.ckpts.remove("best", except_steps=[s for s in run.ckpts.steps("best") if s <= found.step])
        if run.job.keep_best and run.progress.best_step is not None \
                and run.progress.best_step not in run.ckpts.steps("best"):
            raise CaplineError(f"{found.path}: its best weights (step {run.progress.best_step}) are missing from "
                               f"{run.ckpts.root}; delete the folder to start over")
    log.info("%s: resuming from %s (step %d, epoch %d, batch %d of %d)", name, found.path, found.step,
             run.progress.epoch, run.progress.position, run.job.batches_per_epoch)
    return True


# ------------------------------------------------------------------- epochs
def run_epoch(run: Run) -> None:
    """Train the rest of ``run.progress.epoch``; validate and checkpoint at its end."""
    p, job = run.progress, run.job
    batches = job.epoch_batches(p.epoch)
    run.net.train(job.train_mode)
    for b in range(p.position, job.batches_per_epoch):
        train_step(run, batches[b])
        p.position = b + 1
        last = p.position == job.batches_per_epoch
        if p.step % job.log_every == 0 or last:
            log_row(run)
        if last:
            break
        if job.eval_every and p.step % job.eval_every == 0:
            evaluate(run)
            if p.stopped_early:
                return
        if job.checkpoint_every and p.step % job.checkpoint_every == 0:
            checkpoint(run)
        _maybe_stop(run)
    p.epoch_summary = job.epoch_summary(p.epoch_rows)
    evaluate(run)
    if run.rank.is_main:
        run.bar.write(job.epoch_message(p))
    p.epoch, p.position, p.epoch_rows = p.epoch + 1, 0, []
    if not p.stopped_early:
        checkpoint(run)
    _maybe_stop(run)


def train_step(run: Run, batch: np.ndarray) -> None:
    """One optimizer step on one global batch (this process's micro-batches)."""
    p, job = run.progress, run.job
    t0 = time.perf_counter()
    accum = job.grad_accum
    parts = job.micro_batches(batch, run.rank.world_size * accum)
    micro = parts[run.rank.rank * accum:(run.rank.rank + 1) * accum]
    row = optimizer_step(run, micro, scale=run.rank.world_size / float(job.global_count(batch)))
    if not math.isfinite(row[0]):
        raise Diverged(f"{job.name}: loss is {row[0]} at step {p.step + 1} (epoch {p.epoch}); "
                       f"lower {job.name}.lr or use {job.name}.precision fp32")
    run.lr_used = job.schedule.get_last_lr()[0]  # this step's rate, before the schedule moves on
    job.schedule.step()
    p.step += 1
    run.window.append(row)
    run.samples += sum(len(m) for m in micro)
    run.step_seconds += time.perf_counter() - t0
    run.bar.update(1)
    run.bar.set_postfix(epoch=p.epoch, **job.postfix(row))


def optimizer_step(run: Run, micro: Sequence, scale: float) -> list[float]:
    """Forward and backward of this process's micro-batches, then clip and step.

    Each micro-batch's summed loss is multiplied by ``scale`` (world size / the global
    batch's count). Gradients are all-reduced once, after the last micro-batch.
    Returns ``job.step_row`` of the micro-batches' stats: this process's sums.
    """
    job, net = run.job, run.net
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    job.optimizer.zero_grad(set_to_none=True)
    stats = []
    for a, part in enumerate(micro):
        sync = not ddp or a == len(micro) - 1
        with (contextlib.nullcontext() if sync else net.no_sync()):
            loss_sum, part_stats = job.micro_loss(net, part)
            run.scaler.scale(loss_sum * scale).backward()
        stats.append(part_stats)
    row = job.step_row(stats)
    run.scaler.unscale_(job.optimizer)
    if job.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(job.trainable, job.grad_clip)
    run.scaler.step(job.optimizer)
    run.scaler.update()
    return row


def log_row(run: Run) -> None:
    """A curve row from every process's steps since the last row (summed step by step)."""
    window = torch.tensor(run.window, dtype=torch.float64, device=run.device)
    all_reduce_sum(window)
    rows = window.tolist()
    run.window = []
    run.progress.epoch_rows += rows
    run.progress.curve.append(run.job.curve_row(run.progress, rows, run.lr_used))


def evaluate(run: Run) -> None:
    """Validate now; keep the best weights; decide on early stopping."""
    p, job = run.progress, run.job
    t0 = time.perf_counter()
    score, row = job.validate(p)
    run.val_seconds += time.perf_counter() - t0
    p.last_val = score
    if row is not None:
        p.val_curve.append(row)
    if score is None:
        return
    if p.best_score is None or job.better(score, p.best_score):
        p.best_score, p.best_step, p.evals_since_best = score, p.step, 0
        if job.keep_best and run.rank.is_main:
            t0 = time.perf_counter()
            run.ckpts.save(p.step, prefix="best", keep=10**9, modules=job.modules, state={"score": score})
            _prune_best(run)
            run.checkpoint_seconds += time.perf_counter() - t0
    else:
        p.evals_since_best += 1
        if job.patience and p.evals_since_best >= job.patience:
            p.stopped_early = True
            log.info("%s: stopping early at step %d: %d validations without improvement on step %d's %.4f",
                     job.name, p.step, p.evals_since_best, p.best_step, p.best_score)
    if run.rank.is_main:
        job.write_curves(p)


def checkpoint(run: Run) -> None:
    """Save the whole state (rank 0 writes; every rank's RNG and curve window go in)."""
    t0 = time.perf_counter()
    per_rank = gather({"rng": capture_rng(), "window": run.window})
    if run.rank.is_main:
        run.ckpts.save(run.progress.step, modules=run.job.modules, stateful=run.stateful,
                       state={"progress": asdict(run.progress), "window": [r["window"] for r in per_rank]},
                       rng=[r["rng"] for r in per_rank])
        _prune_best(run)
        run.job.write_curves(run.progress)
    run.checkpoint_seconds += time.perf_counter() - t0


def _prune_best(run: Run) -> None:
    """Keep the best weights the current run and each kept checkpoint refer to."""
    wanted = {run.progress.best_step}
    for step in run.ckpts.steps():
        try:
            wanted.add(load_checkpoint(run.ckpts.path(step)).meta["state"]["progress"]["best_step"])
        except (CaplineError, KeyError, TypeError):
            pass
    run.ckpts.remove("best", except_steps=[s for s in wanted if s is not None])


def _maybe_stop(run: Run) -> None:
    if run.stop_after is not None and run.progress.step >= run.stop_after:
        raise Stopped(f"stopped after step {run.progress.step}")


# -------------------------------------------------------------------- finish
def finish(run: Run) -> dict:
    """The kept weights into rank 0's model; the job's outputs; checkpoints removed.

    Only rank 0 writes, so only its model takes the best weights (the other ranks'
    checkpoint folders may be temporary ones, without them).
    """
    p, job = run.progress, run.job
    kept = "last"
    if job.keep_best:
        if p.best_step is None:
            log.warning("%s: no validation score (the val split is empty); the last weights are kept", job.name)
        else:
            kept = "best"
    if kept == "best" and run.rank.is_main:
        load_checkpoint(run.ckpts.path(p.best_step, "best")).restore(modules=job.modules)
    metrics = job.finish(run, kept)
    if run.rank.is_main:
        # The run is complete: nothing is left to resume.
        run.ckpts.remove("step")
        run.ckpts.remove("best")
    barrier()
    return metrics


def sum_across(value: float, device: torch.device) -> float:
    """``value`` summed over the processes (itself without a process group)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    return float(all_reduce_sum(t)[0])


def rounded(x: Optional[float]) -> Optional[float]:
    """A metric as written: 6 decimals, None for a missing or NaN value."""
    return None if x is None or math.isnan(x) else round(float(x), 6)
