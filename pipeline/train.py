"""Training the ClipCap mapper (and GPT-2 when fine-tuned) on feature shards.

One sample per (image, caption) pair; each image's vector is kept once and looked up
by index, so five captions do not mean five copies. Captions are tokenised once up
front and padded per batch to the batch's longest caption (not a fixed length).
AdamW with linear warm-up then linear decay; validation loss (token-weighted) on the
val split after each epoch. Launched by torchrun with WORLD_SIZE > 1 it trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA) and only rank 0 writes files.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.errors import CaplineError
from pipeline.features import FeatureShardError, attr_value
from pipeline.files import write_atomic, write_metrics
from pipeline.models.captioner import ClipCaptioner
from pipeline.models.mapper import count_parameters
from pipeline.params import MapperParams, ParamsError, TrainParams
from pipeline.runtime import all_reduce_sum, autocast, barrier, choose_device, choose_precision, current_rank, \
    process_group

log = logging.getLogger(__name__)
CURVE_FIELDS = ("step", "epoch", "train_loss", "val_loss", "lr")


class TrainingDiverged(CaplineError):
    """The loss became inf or NaN; the message says at which step and what to change."""


@dataclass
class Pairs:
    """Image vectors stored once, and one (image index, token ids) per caption."""

    vectors: torch.Tensor  # [images, D] float32
    image_index: list[int]
    tokens: list[list[int]]

    def __len__(self) -> int:
        return len(self.tokens)


def make_pairs(model: ClipCaptioner, embeddings: np.ndarray, captions: list[list[str]], max_tokens: int) -> Pairs:
    image_index, tokens = [], []
    for i, caps in enumerate(captions):
        for cap in caps:
            if cap and cap.strip():
                image_index.append(i)
                tokens.append(model.encode_caption(cap, max_tokens))
    return Pairs(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)), image_index, tokens)


def collate(pairs: Pairs, indices: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectors, right-padded token ids and attention mask for the samples ``indices``."""
    rows = [pairs.tokens[i] for i in indices]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    vectors = pairs.vectors[[pairs.image_index[i] for i in indices]]
    return vectors, ids, mask


def train(
    features_dir: str | Path,
    gpt_dir: str | Path,
    out_dir: str | Path,
    curve_path: str | Path,
    metrics_path: str | Path,
    mapper: MapperParams,
    train: TrainParams,
    progress: bool = True,
    device: str = "auto",
) -> dict:
    """Train a captioner on ``features_dir``'s train split; write model, curve, metrics.

    Returns the metrics dict (also written, as JSON, to ``metrics_path`` by rank 0).
    """
    from tqdm import tqdm

    from pipeline.features import load_features

    started = time.perf_counter()
    rank = current_rank()
    device = choose_device(device, rank, key="device")
    group = ExitStack()
    group.enter_context(process_group(rank, device))
    try:
        amp = choose_precision(train.precision, device, key="train.precision")
        torch.manual_seed(train.seed)
        np.random.seed(train.seed)

        table = load_features(Path(features_dir))
        dim = int(table.embeddings.shape[1]) if table.embeddings.ndim == 2 else 0
        splits = np.asarray(table.splits)
        if not (splits == "train").any():
            raise FeatureShardError(f"{features_dir}: no images in the train split")

        model = _build_model(gpt_dir, mapper, train, table.attrs, dim).to(device)
        room = model.max_positions - mapper.prefix_length
        if room < 2:  # a word and EOS at the least; fewer would crash inside GPT-2
            raise ParamsError(f"mapper.prefix_length: {mapper.prefix_length} leaves {max(room, 0)} of GPT-2's "
                              f"{model.max_positions} positions for the caption; it needs at least 2")
        max_tokens = train.max_caption_tokens
        if max_tokens > room:
            log.warning("train.max_caption_tokens %d cut to %d: GPT-2 has %d positions and the prefix takes %d",
                        max_tokens, room, model.max_positions, mapper.prefix_length)
            max_tokens = room
        train_pairs = _subset_pairs(model, table, splits == "train", max_tokens)
        val_pairs = _subset_pairs(model, table, splits == "val", max_tokens)
        if len(train_pairs) == 0:
            raise FeatureShardError(f"{features_dir}: the train split has no non-empty captions")

        sampler = torch.utils.data.DistributedSampler(
            range(len(train_pairs)), num_replicas=rank.world_size, rank=rank.rank, shuffle=True, seed=train.seed
        )
        steps_per_epoch = math.ceil(len(sampler) / train.batch_size)
        total_steps = steps_per_epoch * train.epochs
        if train.warmup_steps >= total_steps:
            log.warning("train.warmup_steps %d >= %d training steps: the learning rate never reaches train.lr",
                        train.warmup_steps, total_steps)

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
        from transformers import get_linear_schedule_with_warmup

        schedule = get_linear_schedule_with_warmup(optimizer, train.warmup_steps, total_steps)
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        net: torch.nn.Module = model
        if rank.world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )

        curve: list[dict] = []
        step, window, window_n = 0, 0.0, 0
        epoch_loss, val_loss = float("nan"), None
        bar = tqdm(total=total_steps, desc="train", unit="step", disable=not (progress and rank.is_main))
        for epoch in range(1, train.epochs + 1):
            sampler.set_epoch(epoch)
            order = list(sampler)
            net.train()
            epoch_sum, epoch_n = 0.0, 0
            for b in range(steps_per_epoch):
                vectors, ids, mask = collate(train_pairs, order[b * train.batch_size:(b + 1) * train.batch_size],
                                             model.pad_token_id)
                with autocast(device, amp):
                    loss = net(vectors.to(device), ids.to(device), mask.to(device))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"train: loss is {loss.item()} at step {step + 1} (epoch {epoch}); "
                                             "lower train.lr or use train.precision fp32")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if train.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr_used = schedule.get_last_lr()[0]  # the rate of this step, before the schedule moves on
                schedule.step()
                step += 1
                value = loss.item()
                window, window_n = window + value, window_n + 1
                epoch_sum, epoch_n = epoch_sum + value, epoch_n + 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{value:.3f}")
                last_of_epoch = b == steps_per_epoch - 1
                if step % train.log_every == 0 or last_of_epoch:
                    mean = _mean_across(window, window_n, device)
                    row = {"step": step, "epoch": epoch, "train_loss": mean, "val_loss": None,
                           "lr": lr_used}
                    curve.append(row)
                    window, window_n = 0.0, 0
            epoch_loss = _mean_across(epoch_sum, epoch_n, device)
            val_loss = validate(model, val_pairs, train.batch_size, device, amp, rank)
            curve[-1]["val_loss"] = val_loss
            if rank.is_main:
                write_curve(curve_path, curve)
                bar.write(f"epoch {epoch}: train_loss {epoch_loss:.4f}"
                          + (f"  val_loss {val_loss:.4f}" if val_loss is not None else ""))
        bar.close()

        seconds = time.perf_counter() - started
        metrics = {
            "train_loss": _round(epoch_loss),
            "val_loss": _round(val_loss),
            "params_trainable": count_parameters(model, trainable_only=True),
            "params_total": count_parameters(model),
            "mapper_layers": mapper.layers if mapper.type == "transformer" else 0,
            "epochs": train.epochs,
            "steps": step,
            "train_pairs": len(train_pairs),
            "train_images": int((splits == "train").sum()),
            "val_pairs": len(val_pairs),
            "world_size": rank.world_size,
            "precision": amp,
            "device": str(device),
            "gpt_model_id": model.gpt_source.get("model_id"),
            "gpt_revision": model.gpt_source.get("revision"),
            "seconds": round(seconds, 2),
            "pairs_per_s": round(len(train_pairs) * train.epochs / max(seconds, 1e-9), 2),
        }
        if rank.is_main:
            model.save(out_dir)
            write_metrics(metrics_path, metrics)
        barrier()
        return metrics
    finally:
        group.close()


def _build_model(gpt_dir, mapper: MapperParams, train: TrainParams, attrs: dict, dim: int) -> ClipCaptioner:
    from pipeline.models.pretrained import load_gpt, read_pin

    gpt, tokenizer = load_gpt(Path(gpt_dir))
    features = {k: attr_value(v) for k, v in attrs.items()}
    features["dim"] = dim
    pin = read_pin(Path(gpt_dir))
    source = {k: pin[k] for k in ("model_id", "revision", "sha256")}
    return ClipCaptioner.from_settings(mapper.model_dump(), dim, gpt, tokenizer, features=features,
                                       finetune_gpt=train.finetune_gpt, gpt_source=source)


def _subset_pairs(model: ClipCaptioner, table, select: np.ndarray, max_tokens: int) -> Pairs:
    idx = np.flatnonzero(select)
    emb = table.embeddings[idx] if len(idx) else np.zeros((0, table.embeddings.shape[1]), np.float32)
    return make_pairs(model, emb, [table.captions[i] for i in idx], max_tokens)


@torch.no_grad()
def validate(model: ClipCaptioner, pairs: Pairs, batch_size: int, device: torch.device, amp, rank) -> Optional[float]:
    """Token-weighted mean caption loss over ``pairs`` (each rank takes every world_size-th)."""
    if len(pairs) == 0:
        return None
    was_training = model.training
    model.eval()
    mine = list(range(rank.rank, len(pairs), rank.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(0, len(mine), batch_size):
        vectors, ids, mask = collate(pairs, mine[b:b + batch_size], model.pad_token_id)
        with autocast(device, amp):
            loss = model(vectors.to(device), ids.to(device), mask.to(device), reduction="sum")
        total[0] += loss.double()
        total[1] += mask.sum()
    all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1])


def _mean_across(total: float, count: int, device: torch.device) -> float:
    """Mean over all processes (every rank reaches the same steps)."""
    t = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device))
    return float(t[0]) / max(int(t[1]), 1)


def write_curve(path: str | Path, rows: list[dict]) -> None:
    """The loss curve as CSV (x = step) for `dvc plots show`; val_loss only at epoch ends."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in CURVE_FIELDS})
    write_atomic(path, buf.getvalue())


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else round(float(x), 6)

