"""Cross-entropy training of the ClipCap mapper (and GPT-2 when fine-tuned) on feature shards.

``XeJob`` says what a step computes (the summed token loss of micro-batches of
pairs), how validation scores (token-weighted loss) and what ``finish`` writes; the
loop, DDP, mixed precision, checkpoints, resume and best weights are
``pipeline/train/loop.py``'s, shared with SCST.

* One sample per (image, caption) pair; captions are tokenised once; image vectors
  are held once (or streamed by shard, see ``pipeline/train/data.py``).
* ``train.batch_size`` is the global batch. It is cut into ``world_size ×
  grad_accum`` micro-batches; each micro-batch's summed token loss is divided by
  the global batch's token count (times world_size, which DDP's averaging undoes),
  so a step's gradient is that of the whole batch's mean token loss, whatever the
  number of processes.
* AdamW, linear warm-up then linear decay, gradient clipping.
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

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.core.checkpoint import digest_files
from pipeline.core.files import write_csv, write_metrics
from pipeline.models.trainable import finetune_gpt_parts
from pipeline.train.loop import check_batch_size, rounded, run_job, sum_across
from pipeline.models.captioner import ClipCaptioner, check_clip_folder, room_after_prefix
from pipeline.models.mapper import count_parameters, mapper_class
from pipeline.core.params import MapperParams, ParamsError, RetrievalParams, TrainParams
from pipeline.models.prompt import RetrievalSettings, pad_left
from pipeline.retrieval.neighbours import shard_neighbours
from pipeline.core.runtime import Rank, all_reduce_sum, autocast, choose_device, choose_precision, current_rank, \
    process_group
from pipeline.train.data import collate, epoch_batches, load_training_data, micro_batches, validation_batches

log = logging.getLogger(__name__)
CURVE_FIELDS = ("step", "epoch", "train_loss", "lr")
VAL_FIELDS = ("step", "epoch", "val_loss")
# Params that do not change the trajectory: a checkpoint made with other values resumes.
NOT_IDENTITY = ("checkpoint_every",)


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
    retrieval: Optional[RetrievalParams] = None,
    retrieval_dir: str | Path | None = None,
) -> dict:
    """Train a captioner on ``features_dir``'s train split; write model, curves, metrics.

    ``checkpoint_dir``: where checkpoints go and are resumed from (None: a temporary
    folder, so no resume). ``val_curve_path`` defaults to ``val.csv`` beside the
    curve. ``stop_after``: raise ``pipeline.train.loop.Stopped`` after that many steps, as a
    kill would (tests). ``clip_dir``: the pinned CLIP folder that made the features,
    copied into the model folder (checked against the features before training starts).
    ``retrieval`` with k > 0: the captioner reads each image's k retrieved captions from the
    neighbour shards in ``retrieval_dir`` (joined by key) in its prompt.
    Returns the metrics dict (also written, as JSON, to ``metrics_path`` by rank 0).
    """
    started = time.perf_counter()
    rank = current_rank()
    device = choose_device(device, rank, key="device")
    with process_group(rank, device):
        job = XeJob(Path(features_dir), Path(gpt_dir), mapper, train, rank, device, clip_dir,
                    retrieval=retrieval, retrieval_dir=retrieval_dir)
        job.outputs(Path(out_dir), Path(curve_path),
                    Path(val_curve_path or Path(curve_path).with_name("val.csv")), Path(metrics_path), started)
        return run_job(job, rank, device, checkpoint_dir, progress, stop_after)


class XeJob:
    """Cross-entropy training as a job of ``pipeline.train.loop``: data, model, optimizer, identity."""

    name = "train"
    validate_first = False
    train_mode = True  # dropout on (a frozen GPT-2 stays in eval mode)

    def __init__(self, features_dir: Path, gpt_dir: Path, mapper: MapperParams, params: TrainParams, rank: Rank,
                 device: torch.device, clip_dir=None, retrieval: Optional[RetrievalParams] = None,
                 retrieval_dir=None) -> None:
        from transformers import get_linear_schedule_with_warmup

        from pipeline.models.pretrained import load_gpt, read_pin

        kind = mapper_class(mapper.type)  # an unknown mapper.type stops here, before anything is loaded
        self.amp = choose_precision(params.precision, device, key="train.precision")
        check_batch_size("train", params.batch_size, rank.world_size, params.grad_accum)
        torch.manual_seed(params.seed)
        np.random.seed(params.seed)

        gpt, tokenizer = load_gpt(gpt_dir)
        settings = RetrievalSettings()
        if retrieval is not None and retrieval.k > 0:
            settings = RetrievalSettings(k=retrieval.k, template=retrieval.template,
                                         max_caption_tokens=retrieval.max_caption_tokens,
                                         separator=retrieval.separator)
        prompt_room = settings.max_tokens(tokenizer)
        # The caption room is known from GPT-2's config before anything is built.
        room = room_after_prefix(gpt.config, mapper.prefix_length) - prompt_room
        if room < 2:  # a word and EOS at the least; fewer would crash inside GPT-2
            raise ParamsError(f"mapper.prefix_length: {mapper.prefix_length} and a prompt of up to {prompt_room} "
                              f"tokens (retrieval.k {settings.k}) leave {max(room, 0)} of GPT-2's "
                              f"{room + mapper.prefix_length + prompt_room} positions for the caption; it needs at "
                              "least 2")
        max_tokens = params.max_caption_tokens
        if max_tokens > room:
            log.warning("train.max_caption_tokens %d cut to %d: GPT-2 has %d positions and the prefix takes %d",
                        max_tokens, room, room + mapper.prefix_length, mapper.prefix_length)
            max_tokens = room
        dataset = "patch_tokens" if kind.patch_tokens else "embeddings"
        data = load_training_data(features_dir, tokenizer, max_tokens, params.max_memory_gb, dataset=dataset)
        features = {**data.attrs, "dim": data.dim}
        self.prompts = None  # prompt ids of each global image row (retrieval)
        if settings.k > 0:
            if retrieval_dir is None:
                raise ParamsError("retrieval.k > 0 needs the neighbour shards (--retrieval data/retrieval)")
            neighbours, identity = shard_neighbours(Path(retrieval_dir), data.keys, settings.k)
            settings = replace(settings, datastore=identity)
            self.prompts = settings.token_ids(tokenizer, neighbours)
        finetune = params.finetune_gpt
        if finetune and kind.freezes_gpt:
            # SmallCap's design: GPT-2 stays frozen, only the cross-attention learns.
            log.warning("train.finetune_gpt ignored: mapper.type %s keeps GPT-2 frozen", mapper.type)
            finetune = False
        pin = read_pin(gpt_dir)
        source = {k: pin[k] for k in ("model_id", "revision", "sha256")}
        model = ClipCaptioner.from_settings(mapper.model_dump(), data.dim, gpt, tokenizer, features=features,
                                            finetune_gpt=finetune, gpt_source=source, retrieval=settings).to(device)
        if clip_dir is not None:
            check_clip_folder(Path(clip_dir), model.features)  # a wrong --clip fails now, not after training
        if params.finetune_gpt_layers is not None:  # train only these parts of GPT-2 (the seed's model)
            finetune_gpt_parts(model.gpt, params.finetune_gpt_layers)

        self.batches_per_epoch = len(data.train) // params.batch_size
        if self.batches_per_epoch == 0:
            raise ParamsError(f"train.batch_size: {params.batch_size} is more than the {len(data.train)} caption "
                              "pairs of the train split; not one full batch")
        total_steps = self.batches_per_epoch * params.epochs
        if params.warmup_steps >= total_steps:
            log.warning("train.warmup_steps %d >= %d training steps: the learning rate never reaches train.lr",
                        params.warmup_steps, total_steps)
        self.params, self.mapper_params, self.rank, self.device = params, mapper, rank, device
        self.data, self.model, self.clip_dir = data, model, clip_dir
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        log.info("train: %s trainable parameters of %s (mapper.type %s)", f"{count_parameters(model, True):,}",
                 f"{count_parameters(model):,}", mapper.type)
        self.optimizer = make_optimizer(self.trainable, params, device)
        self.schedule = get_linear_schedule_with_warmup(self.optimizer, params.warmup_steps, total_steps)
        self.modules = {"mapper": model.mapper, **({"gpt": model.gpt} if model.finetune_gpt else {})}
        self.identity = {
            "params": {"mapper": mapper.model_dump(), "train": params.model_dump(exclude=set(NOT_IDENTITY)),
                       **({"retrieval": settings.to_dict()} if settings.k else {})},
            "features": digest_files(features_dir),
            "gpt": digest_files(gpt_dir),
            **({"neighbours": digest_files(retrieval_dir)} if settings.k else {}),
            "precision": self.amp,
            "device": device.type,
        }
        self.epochs, self.batch_size, self.grad_accum = params.epochs, params.batch_size, params.grad_accum
        self.log_every, self.eval_every = params.log_every, params.eval_every
        self.checkpoint_every, self.patience = params.checkpoint_every, params.early_stopping_patience
        self.keep_best, self.grad_clip = params.keep == "best", params.grad_clip
        self.tokens = 0  # this process's trained caption tokens

    def outputs(self, out_dir: Path, curve_path: Path, val_curve_path: Path, metrics_path: Path,
                started: float) -> None:
        self.out_dir, self.curve_path, self.val_curve_path = out_dir, curve_path, val_curve_path
        self.metrics_path, self.started = metrics_path, started

    # ------------------------------------------------------------- steps
    def epoch_batches(self, epoch: int) -> np.ndarray:
        p = self.params
        return epoch_batches(self.data, p.batch_size, p.seed, epoch, p.bucket_by_length)

    def micro_batches(self, batch: np.ndarray, parts: int) -> list[np.ndarray]:
        return micro_batches(batch, self.data.train.lengths, parts)

    def global_count(self, batch: np.ndarray) -> int:
        """The global batch's caption tokens: each micro-batch's loss sum is divided by them."""
        return int(self.data.train.lengths[batch].sum())

    def prompt(self, captions, idx: np.ndarray):
        """The left-padded prompt ids and mask of the pairs ``idx`` (None without retrieval)."""
        if self.prompts is None:
            return None
        return pad_left([self.prompts[r] for r in captions.rows[np.asarray(idx, dtype=np.int64)]],
                        self.model.pad_token_id)

    def micro_loss(self, net: torch.nn.Module, idx: np.ndarray) -> tuple[torch.Tensor, tuple]:
        vectors, ids, mask = collate(self.data.train, self.data.vectors, idx, self.model.pad_token_id)
        d = self.device
        with autocast(d, self.amp):
            loss_sum = net(vectors.to(d, non_blocking=True), ids.to(d, non_blocking=True),
                           mask.to(d, non_blocking=True), reduction="sum", prompt=self.prompt(self.data.train, idx))
        return loss_sum, (loss_sum.detach(), int(mask.sum()))

    def step_row(self, stats: list) -> list[float]:
        """[summed token loss, tokens] of this process's micro-batches (one device sync)."""
        tokens = sum(t for _, t in stats)
        self.tokens += tokens
        return [float(torch.stack([s for s, _ in stats]).sum()), tokens]

    def postfix(self, row: list) -> dict:
        return {"loss": f"{row[0] / max(row[1], 1):.3f}"}

    def curve_row(self, p, rows: list, lr: Optional[float]) -> dict:
        """The mean token loss over every process's steps since the last row."""
        return {"step": p.step, "epoch": p.epoch, "train_loss": self.epoch_summary(rows), "lr": lr}

    def epoch_summary(self, rows: list) -> Optional[float]:
        loss, tokens = sum(r[0] for r in rows), sum(r[1] for r in rows)
        return loss / tokens if tokens > 0 else None

    # -------------------------------------------------------- validation
    def validate(self, p) -> tuple[Optional[float], Optional[dict]]:
        loss = validation_loss(self)
        return loss, None if loss is None else {"step": p.step, "epoch": p.epoch, "val_loss": loss}

    @staticmethod
    def better(score: float, best: float) -> bool:
        return score < best

    def epoch_message(self, p) -> str:
        return f"epoch {p.epoch}: train_loss {_fmt(p.epoch_summary)}  val_loss {_fmt(p.last_val)}"

    def write_curves(self, p) -> None:
        write_csv(self.curve_path, CURVE_FIELDS, p.curve)
        write_csv(self.val_curve_path, VAL_FIELDS, p.val_curve)

    # ------------------------------------------------------------ finish
    def finish(self, run, kept: str) -> dict:
        """Curves, the model folder and metrics (rank 0)."""
        p, params, model, data = run.progress, self.params, self.model, self.data
        mapper = self.mapper_params
        metrics = {
            "train_loss": rounded(p.epoch_summary),
            "val_loss": rounded(p.last_val),
            "best_step": p.best_step,
            "best_val_loss": rounded(p.best_score),
            "kept": kept,
            "stopped_early": p.stopped_early,
            "steps": p.step,
            "epochs": params.epochs,
            "resumed_from_step": run.resumed_from,
            "params_trainable": count_parameters(model, trainable_only=True),
            "params_total": count_parameters(model),
            "mapper_layers": mapper.layers if mapper.type == "transformer" else 0,
            "features": data.dataset,
            "train_pairs": len(data.train),
            "train_images": data.train_images,
            "val_pairs": len(data.val),
            "batch_size": params.batch_size,
            "grad_accum": params.grad_accum,
            "world_size": run.rank.world_size,
            "precision": self.amp,
            "device": str(run.device),
            "gpt_model_id": model.gpt_source.get("model_id"),
            "gpt_revision": model.gpt_source.get("revision"),
            "streamed": bool(getattr(data.vectors, "streamed", False)),
            "load_seconds": round(data.load_seconds, 2),
            "tokenize_seconds": round(data.tokenize_seconds, 2),
            "train_seconds": round(run.step_seconds, 2),
            "val_seconds": round(run.val_seconds, 2),
            "checkpoint_seconds": round(run.checkpoint_seconds, 2),
            "seconds": round(time.perf_counter() - self.started, 2),
            # The training steps alone, all processes: samples (pairs) and caption tokens per second.
            "samples_per_s": round(run.samples * run.rank.world_size / max(run.step_seconds, 1e-9), 2),
            "tokens_per_s": round(sum_across(self.tokens, run.device) / max(run.step_seconds, 1e-9), 1),
        }
        if run.rank.is_main:
            self.write_curves(p)
            model.save(self.out_dir, clip_dir=self.clip_dir)
            write_metrics(self.metrics_path, metrics)
        return metrics


def make_optimizer(trainable: list, params: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over each tensor) where torch has it for the device."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):  # older torch: no fused CPU AdamW
            pass
    return torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)


@torch.no_grad()
def validation_loss(job: XeJob) -> Optional[float]:
    """Token-weighted mean caption loss over the val pairs (each rank takes every world_size-th)."""
    data, model, device = job.data, job.model, job.device
    if len(data.val) == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    world = job.rank.world_size
    for idx in validation_batches(data.val, data.vectors, job.rank.rank, world, max(1, job.batch_size // world)):
        vectors, ids, mask = collate(data.val, data.vectors, idx, model.pad_token_id)
        with autocast(device, job.amp):
            loss = model(vectors.to(device), ids.to(device), mask.to(device), reduction="sum",
                         prompt=job.prompt(data.val, idx))
        total[0] += loss.double()
        total[1] += int(mask.sum())
    all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1])


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"
