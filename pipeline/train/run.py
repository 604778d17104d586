"""Training the ClipCap mapper (and GPT-2 when fine-tuned) on feature shards.

``train()`` is three parts: ``setup`` (data, model, optimizer, checkpoint
identity, resume), ``run_epoch`` (steps, validation, checkpoints) and ``finish``
(the best or last weights into ``model.save``, curves, metrics).

* One sample per (image, caption) pair; captions are tokenised once; image vectors
  are held once (or streamed by shard, see ``pipeline/train/data.py``).
* ``train.batch_size`` is the global batch. It is cut into ``world_size ×
  grad_accum`` micro-batches; each micro-batch's summed token loss is divided by
  the global batch's token count (times world_size, which DDP's averaging undoes),
  so a step's gradient is that of the whole batch's mean token loss, whatever the
  number of processes.
* AdamW, linear warm-up then linear decay, gradient clipping, one mixed-precision
  path (a disabled ``GradScaler`` is a no-op).
* Validation loss (token-weighted) every ``train.eval_every`` steps and at each
  epoch end; the best weights by validation loss are kept (``train.keep``) and
  optionally training stops after ``train.early_stopping_patience`` validations
  without improvement.
* Checkpoints (``pipeline/core/checkpoint.py``) every ``train.checkpoint_every`` steps and
  at each epoch end; a rerun with the same params, features and GPT-2 resumes from
  the newest one and ends with the same weights as an uninterrupted run.
* Under torchrun (WORLD_SIZE > 1): DistributedDataParallel (gloo on CPU, nccl on
  CUDA); rank 0 writes every file.
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
from typing import Any, Optional

import numpy as np
import torch

from pipeline.core.checkpoint import Checkpoints, capture_rng, digest_files, load_checkpoint, restore_rng
from pipeline.core.errors import CaplineError
from pipeline.core.files import write_csv, write_metrics
from pipeline.models.trainable import finetune_gpt_parts
from pipeline.models.captioner import ClipCaptioner, check_clip_folder
from pipeline.models.mapper import count_parameters, mapper_class
from pipeline.core.params import MapperParams, ParamsError, TrainParams
from pipeline.core.runtime import (Rank, all_reduce_sum, autocast, barrier, choose_device, choose_precision,
                              current_rank, gather, process_group)
from pipeline.train.data import (TrainingData, collate, epoch_batches, load_training_data, micro_batches,
                                 validation_batches)

log = logging.getLogger(__name__)
CURVE_FIELDS = ("step", "epoch", "train_loss", "lr")
VAL_FIELDS = ("step", "epoch", "val_loss")
# Params that do not change the trajectory: a checkpoint made with other values resumes.
NOT_IDENTITY = ("checkpoint_every",)


class TrainingDiverged(CaplineError):
    """The loss became inf or NaN; the message says at which step and what to change."""


class _StopForTest(Exception):
    """Raised after ``stop_after`` steps: a kill at a known point, for tests."""


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint stores as JSON."""

    step: int = 0
    epoch: int = 1  # the epoch being trained
    position: int = 0  # the next batch of that epoch
    curve: list = field(default_factory=list)  # train rows
    val_curve: list = field(default_factory=list)  # val rows
    best_step: Optional[int] = None
    best_loss: Optional[float] = None
    evals_since_best: int = 0
    stopped_early: bool = False
    last_val: Optional[float] = None
    last_epoch_loss: Optional[float] = None


@dataclass
class Local:
    """Per-process sums since the last curve row / epoch start (saved per rank)."""

    window: list = field(default_factory=lambda: [0.0, 0])  # token loss sum, tokens
    epoch: list = field(default_factory=lambda: [0.0, 0])


@dataclass
class Run:
    """What ``setup`` builds for the loop."""

    rank: Rank
    device: torch.device
    amp: str
    params: TrainParams
    model: ClipCaptioner
    net: torch.nn.Module
    trainable: list
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler
    data: TrainingData
    batches_per_epoch: int
    micro_size: int
    ckpts: Checkpoints
    curve_path: Path
    val_curve_path: Path
    progress: Progress
    local: Local
    resumed_from: int = 0
    temp_checkpoints: Optional[Path] = None
    stop_after: Optional[int] = None
    # timings of this process's run
    step_seconds: float = 0.0
    val_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    lr_used: Optional[float] = None
    bar: Any = None

    @property
    def checkpoint_modules(self) -> dict:
        mods = {"mapper": self.model.mapper}
        if self.model.finetune_gpt:
            mods["gpt"] = self.model.gpt
        return mods


# ------------------------------------------------------------------- train()
def train(
    features_dir: str | Path,
    gpt_dir: str | Path,
    out_dir: str | Path,
    curve_path: str | Path,
    metrics_path: str | Path,
    mapper: MapperParams,
    train: TrainParams,
    progress: bool = True,
    *,
    val_curve_path: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    stop_after: Optional[int] = None,
    clip_dir: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """Train a captioner on ``features_dir``'s train split; write model, curves, metrics.

    ``checkpoint_dir``: where checkpoints go and are resumed from (None: a temporary
    folder, so no resume). ``val_curve_path`` defaults to ``val.csv`` beside the
    curve. ``stop_after``: stop (raise) after that many steps, as a kill would (tests).
    ``clip_dir``: the pinned CLIP folder that made the features, copied into the
    model folder (checked against the features before training starts).
    Returns the metrics dict (also written, as JSON, to ``metrics_path`` by rank 0).
    """
    started = time.perf_counter()
    rank = current_rank()
    device = choose_device(device, rank, key="device")
    with process_group(rank, device):
        run = setup(Path(features_dir), Path(gpt_dir), mapper, train, rank, device,
                    Path(curve_path), Path(val_curve_path or Path(curve_path).with_name("val.csv")),
                    checkpoint_dir, progress, stop_after, clip_dir)
        try:
            while run.progress.epoch <= train.epochs and not run.progress.stopped_early:
                run_epoch(run)
            if run.bar is not None:
                run.bar.close()
            return finish(run, Path(out_dir), Path(metrics_path), mapper, started, clip_dir)
        finally:
            if run.bar is not None:
                run.bar.close()
            if run.temp_checkpoints is not None:
                shutil.rmtree(run.temp_checkpoints, ignore_errors=True)


# -------------------------------------------------------------------- setup
def setup(features_dir: Path, gpt_dir: Path, mapper: MapperParams, params: TrainParams, rank: Rank,
          device: torch.device, curve_path: Path, val_curve_path: Path, checkpoint_dir, progress: bool,
          stop_after: Optional[int], clip_dir=None) -> Run:
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    from pipeline.models.pretrained import load_gpt, read_pin

    mapper_class(mapper.type)  # an unknown mapper.type stops here, before anything is loaded
    amp = choose_precision(params.precision, device, key="train.precision")
    parts = rank.world_size * params.grad_accum
    if params.batch_size % parts:
        raise ParamsError(f"train.batch_size: {params.batch_size} is not divisible by {rank.world_size} "
                          f"process(es) x train.grad_accum {params.grad_accum}; each micro-batch must have "
                          "the same size")
    torch.manual_seed(params.seed)
    np.random.seed(params.seed)

    gpt, tokenizer = load_gpt(gpt_dir)
    # The caption room is known from GPT-2's config before anything is built.
    positions = int(getattr(gpt.config, "n_positions", None) or getattr(gpt.config, "max_position_embeddings", 1024))
    room = positions - mapper.prefix_length
    if room < 2:  # a word and EOS at the least; fewer would crash inside GPT-2
        raise ParamsError(f"mapper.prefix_length: {mapper.prefix_length} leaves {max(room, 0)} of GPT-2's "
                          f"{positions} positions for the caption; it needs at least 2")
    max_tokens = params.max_caption_tokens
    if max_tokens > room:
        log.warning("train.max_caption_tokens %d cut to %d: GPT-2 has %d positions and the prefix takes %d",
                    max_tokens, room, positions, mapper.prefix_length)
        max_tokens = room
    eos = tokenizer.eos_token_id
    if eos is None:
        from pipeline.models.pretrained import ModelError

        raise ModelError(f"{gpt_dir}: the GPT-2 tokenizer has no EOS token; captions could never end")
    data = load_training_data(features_dir, tokenizer, int(eos), max_tokens, params.max_memory_gb)
    features = {**data.attrs, "dim": data.dim}
    pin = read_pin(gpt_dir)
    source = {k: pin[k] for k in ("model_id", "revision", "sha256")}
    model = ClipCaptioner.from_settings(mapper.model_dump(), data.dim, gpt, tokenizer, features=features,
                                        finetune_gpt=params.finetune_gpt, gpt_source=source).to(device)
    if clip_dir is not None:
        check_clip_folder(Path(clip_dir), model.features)  # a wrong --clip fails now, not after training
    if params.finetune_gpt_layers is not None:  # issue 19: train only these parts of GPT-2
        finetune_gpt_parts(model.gpt, params.finetune_gpt_layers)

    batches_per_epoch = len(data.train) // params.batch_size
    if batches_per_epoch == 0:
        raise ParamsError(f"train.batch_size: {params.batch_size} is more than the {len(data.train)} caption "
                          "pairs of the train split; not one full batch")
    total_steps = batches_per_epoch * params.epochs
    if params.warmup_steps >= total_steps:
        log.warning("train.warmup_steps %d >= %d training steps: the learning rate never reaches train.lr",
                    params.warmup_steps, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, params, device)
    schedule = get_linear_schedule_with_warmup(optimizer, params.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    net: torch.nn.Module = model
    if rank.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    temp = None
    if checkpoint_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="capline-train-"))
        checkpoint_dir = temp
    identity = {
        "params": {"mapper": mapper.model_dump(), "train": params.model_dump(exclude=set(NOT_IDENTITY))},
        "features": digest_files(features_dir),
        "gpt": digest_files(gpt_dir),
        "world_size": rank.world_size,
        "precision": amp,
        "device": device.type,
    }
    run = Run(rank=rank, device=device, amp=amp, params=params, model=model, net=net, trainable=trainable,
              optimizer=optimizer, schedule=schedule, scaler=scaler, data=data,
              batches_per_epoch=batches_per_epoch, micro_size=params.batch_size // parts,
              ckpts=Checkpoints(checkpoint_dir, identity, keep=2), curve_path=curve_path,
              val_curve_path=val_curve_path, progress=Progress(), local=Local(), temp_checkpoints=temp,
              stop_after=stop_after)
    resume(run)
    run.bar = tqdm(total=total_steps, initial=run.progress.step, desc="train", unit="step",
                   disable=not (progress and rank.is_main))
    return run


def make_optimizer(trainable: list, params: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over each tensor) where torch has it for the device."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):  # older torch: no fused CPU AdamW
            pass
    return torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)


def resume(run: Run) -> None:
    """Continue from the newest checkpoint of this run's identity, if there is one."""
    found = run.ckpts.latest(quiet=not run.rank.is_main)
    steps = gather(found.step if found is not None else None)
    if len(set(steps)) > 1:
        raise CaplineError(f"train: the processes see different checkpoints in {run.ckpts.root} "
                           f"(steps {steps}); is the folder shared by every node?")
    if found is None:
        if run.rank.is_main and (run.ckpts.steps() or run.ckpts.steps("best")):
            # One run's checkpoints per folder: those of another run (logged above) go.
            log.warning("train: %s holds no checkpoint of this run; its contents are replaced", run.ckpts.root)
            run.ckpts.remove("step")
            run.ckpts.remove("best")
        barrier()
        return
    state = found.restore(modules=run.checkpoint_modules,
                          stateful={"optimizer": run.optimizer, "schedule": run.schedule, "scaler": run.scaler})
    run.progress = Progress(**state["progress"])
    run.local = Local(**state["local"][run.rank.rank])
    restore_rng(found.rng[run.rank.rank])
    run.resumed_from = found.step
    if run.rank.is_main:
        # Best weights found after this checkpoint were never part of it; they come again.
        run.ckpts.remove("best", except_steps=[s for s in run.ckpts.steps("best") if s <= found.step])
        if run.params.keep == "best" and run.progress.best_step is not None \
                and run.progress.best_step not in run.ckpts.steps("best"):
            raise CaplineError(f"{found.path}: its best weights (step {run.progress.best_step}) are missing from "
                               f"{run.ckpts.root}; delete the folder to start over")
    log.info("train: resuming from %s (step %d, epoch %d, batch %d of %d)", found.path, found.step,
             run.progress.epoch, run.progress.position, run.batches_per_epoch)


# ------------------------------------------------------------------- epochs
def run_epoch(run: Run) -> None:
    """Train the rest of ``run.progress.epoch``; validate and checkpoint at its end."""
    p, params = run.progress, run.params
    batches = epoch_batches(run.data, params.batch_size, params.seed, p.epoch, params.bucket_by_length)
    run.net.train()
    for b in range(p.position, run.batches_per_epoch):
        train_step(run, batches[b])
        p.position = b + 1
        last = p.position == run.batches_per_epoch
        if p.step % params.log_every == 0 or last:
            log_row(run)
        if last:
            break
        if params.eval_every and p.step % params.eval_every == 0:
            evaluate(run)
            if p.stopped_early:
                return
        if params.checkpoint_every and p.step % params.checkpoint_every == 0:
            checkpoint(run)
        _maybe_stop(run)
    t = torch.tensor(run.local.epoch, dtype=torch.float64, device=run.device)
    all_reduce_sum(t)
    p.last_epoch_loss = float(t[0] / t[1]) if t[1] > 0 else None
    run.local.epoch = [0.0, 0]
    evaluate(run)
    if run.bar is not None and run.rank.is_main:
        run.bar.write(f"epoch {p.epoch}: train_loss {_fmt(p.last_epoch_loss)}  val_loss {_fmt(p.last_val)}")
    p.epoch, p.position = p.epoch + 1, 0
    if not p.stopped_early:
        checkpoint(run)
    _maybe_stop(run)


def train_step(run: Run, batch: np.ndarray) -> None:
    """One optimizer step on one global batch (this process's micro-batches)."""
    p, params, model = run.progress, run.params, run.model
    t0 = time.perf_counter()
    lengths = run.data.train.lengths
    world, rank = run.rank.world_size, run.rank.rank
    micro = micro_batches(batch, lengths, world * params.grad_accum)[rank * params.grad_accum:
                                                                     (rank + 1) * params.grad_accum]
    tensors = [collate(run.data.train, run.data.vectors, idx, model.pad_token_id) for idx in micro]
    step_loss, step_tokens = optimizer_step(run.net, run.optimizer, run.scaler, run.trainable, tensors,
                                            global_tokens=int(lengths[batch].sum()), world_size=world,
                                            device=run.device, amp=run.amp, grad_clip=params.grad_clip)
    if not math.isfinite(step_loss):
        raise TrainingDiverged(f"train: loss is {step_loss} at step {p.step + 1} (epoch {p.epoch}); "
                               "lower train.lr or use train.precision fp32")
    run.lr_used = run.schedule.get_last_lr()[0]  # this step's rate, before the schedule moves on
    run.schedule.step()
    p.step += 1
    for acc in (run.local.window, run.local.epoch):
        acc[0] += step_loss
        acc[1] += step_tokens
    run.samples += sum(len(m) for m in micro)
    run.tokens += step_tokens
    run.step_seconds += time.perf_counter() - t0
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(epoch=p.epoch, loss=f"{step_loss / max(step_tokens, 1):.3f}")


def optimizer_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   trainable: list, micro: list, global_tokens: int, world_size: int, device: torch.device,
                   amp: str, grad_clip: Optional[float]) -> tuple[float, int]:
    """Forward and backward of this process's micro-batches ``(vectors, ids, mask)``, then
    clip and step. Returns this process's summed token loss and token count.

    Each micro-batch's token-loss sum is divided by the global batch's token count and
    multiplied by ``world_size`` (DDP averages over processes): the gradient is that
    of the global batch's mean token loss. With a frozen GPT-2 no weight gradient of
    GPT-2 is built (its parameters do not require grad); a GradScaler that is not
    enabled passes everything through unchanged.
    """
    scale = world_size / float(global_tokens)
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    optimizer.zero_grad(set_to_none=True)
    losses, tokens = [], 0
    for a, (vectors, ids, mask) in enumerate(micro):
        sync = not ddp or a == len(micro) - 1
        with (contextlib.nullcontext() if sync else net.no_sync()):
            with autocast(device, amp):
                loss_sum = net(vectors.to(device, non_blocking=True), ids.to(device, non_blocking=True),
                               mask.to(device, non_blocking=True), reduction="sum")
            scaler.scale(loss_sum * scale).backward()
        losses.append(loss_sum.detach())
        tokens += int(mask.sum())
    step_loss = float(torch.stack(losses).sum())  # one device sync per step
    scaler.unscale_(optimizer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return step_loss, tokens


def log_row(run: Run) -> None:
    """A train-curve row: the mean token loss over all processes since the last row."""
    t = torch.tensor(run.local.window, dtype=torch.float64, device=run.device)
    all_reduce_sum(t)
    run.local.window = [0.0, 0]
    run.progress.curve.append({"step": run.progress.step, "epoch": run.progress.epoch,
                               "train_loss": float(t[0] / t[1]) if t[1] > 0 else None,
                               "lr": run.lr_used})


def evaluate(run: Run) -> None:
    """Validation loss now; keep the best weights; decide on early stopping."""
    p, params = run.progress, run.params
    t0 = time.perf_counter()
    loss = validate(run)
    run.val_seconds += time.perf_counter() - t0
    p.last_val = loss
    if loss is None:
        return
    p.val_curve.append({"step": p.step, "epoch": p.epoch, "val_loss": loss})
    if p.best_loss is None or loss < p.best_loss:
        p.best_loss, p.best_step, p.evals_since_best = loss, p.step, 0
        if params.keep == "best" and run.rank.is_main:
            t0 = time.perf_counter()
            run.ckpts.save(p.step, prefix="best", keep=10**9, modules=run.checkpoint_modules,
                           state={"val_loss": loss})
            _prune_best(run)
            run.checkpoint_seconds += time.perf_counter() - t0
    else:
        p.evals_since_best += 1
        if params.early_stopping_patience and p.evals_since_best >= params.early_stopping_patience:
            p.stopped_early = True
            log.info("train: stopping early at step %d: %d validations without improvement on step %d's %.4f",
                     p.step, p.evals_since_best, p.best_step, p.best_loss)
    if run.rank.is_main:
        write_curves(run)


@torch.no_grad()
def validate(run: Run) -> Optional[float]:
    """Token-weighted mean caption loss over the val pairs (each rank takes every world_size-th)."""
    data, model = run.data, run.model
    if len(data.val) == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    per_rank = max(1, run.params.batch_size // run.rank.world_size)
    for idx in validation_batches(data.val, data.vectors, run.rank.rank, run.rank.world_size, per_rank):
        vectors, ids, mask = collate(data.val, data.vectors, idx, model.pad_token_id)
        with autocast(run.device, run.amp):
            loss = model(vectors.to(run.device), ids.to(run.device), mask.to(run.device), reduction="sum")
        total[0] += loss.double()
        total[1] += int(mask.sum())
    all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1])


def checkpoint(run: Run) -> None:
    """Save the whole state (rank 0 writes; every rank's RNG and sums go in)."""
    t0 = time.perf_counter()
    per_rank = gather({"rng": capture_rng(), "local": asdict(run.local)})
    if run.rank.is_main:
        run.ckpts.save(run.progress.step, modules=run.checkpoint_modules,
                       stateful={"optimizer": run.optimizer, "schedule": run.schedule, "scaler": run.scaler},
                       state={"progress": asdict(run.progress), "local": [r["local"] for r in per_rank]},
                       rng=[r["rng"] for r in per_rank])
        _prune_best(run)
        write_curves(run)
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
        raise _StopForTest(f"stopped after step {run.progress.step}")


# -------------------------------------------------------------------- finish
def finish(run: Run, out_dir: Path, metrics_path: Path, mapper: MapperParams, started: float,
           clip_dir=None) -> dict:
    """The kept weights into the model folder; curves and metrics; checkpoints removed."""
    p, params, model = run.progress, run.params, run.model
    kept = "last"
    if params.keep == "best":
        if p.best_step is None:
            log.warning("train.keep best: no validation loss (the val split is empty); the last weights are kept")
        else:
            kept = "best"
    metrics = {
        "train_loss": _round(p.last_epoch_loss),
        "val_loss": _round(p.last_val),
        "best_step": p.best_step,
        "best_val_loss": _round(p.best_loss),
        "kept": kept,
        "stopped_early": p.stopped_early,
        "steps": p.step,
        "epochs": params.epochs,
        "resumed_from_step": run.resumed_from,
        "params_trainable": count_parameters(model, trainable_only=True),
        "params_total": count_parameters(model),
        "mapper_layers": mapper.layers if mapper.type == "transformer" else 0,
        "train_pairs": len(run.data.train),
        "train_images": run.data.train_images,
        "val_pairs": len(run.data.val),
        "batch_size": params.batch_size,
        "grad_accum": params.grad_accum,
        "world_size": run.rank.world_size,
        "precision": run.amp,
        "device": str(run.device),
        "gpt_model_id": model.gpt_source.get("model_id"),
        "gpt_revision": model.gpt_source.get("revision"),
        "streamed": bool(getattr(run.data.vectors, "streamed", False)),
        "load_seconds": round(run.data.load_seconds, 2),
        "tokenize_seconds": round(run.data.tokenize_seconds, 2),
        "train_seconds": round(run.step_seconds, 2),
        "val_seconds": round(run.val_seconds, 2),
        "checkpoint_seconds": round(run.checkpoint_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        # The training steps alone, all processes: samples (pairs) and caption tokens per second.
        "samples_per_s": round(run.samples * run.rank.world_size / max(run.step_seconds, 1e-9), 2),
        "tokens_per_s": round(_sum_across(run.tokens, run.device) / max(run.step_seconds, 1e-9), 1),
    }
    if run.rank.is_main:
        if kept == "best":
            load_checkpoint(run.ckpts.path(p.best_step, "best")).restore(modules=run.checkpoint_modules)
        write_curves(run)
        model.save(out_dir, clip_dir=clip_dir)
        write_metrics(metrics_path, metrics)
        # The run is complete: nothing is left to resume.
        run.ckpts.remove("step")
        run.ckpts.remove("best")
    barrier()
    return metrics


def _sum_across(value: int, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    return float(all_reduce_sum(t)[0])


# -------------------------------------------------------------------- curves
def write_curves(run: Run) -> None:
    write_csv(run.curve_path, CURVE_FIELDS, run.progress.curve)
    write_csv(run.val_curve_path, VAL_FIELDS, run.progress.val_curve)


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else round(float(x), 6)
