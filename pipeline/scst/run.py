"""Self-critical sequence training (SCST) of a cross-entropy captioner.

Rennie et al. 2017: for each training image, sample ``samples`` captions from the
model; the reward of a caption is its CIDEr-D against that image's training
references, with document frequencies from the training split; the loss is
``-(reward - baseline) * log p(caption)`` summed over the caption's tokens (EOS
included) and averaged over the captions. The baseline is the mean reward of the
image's other samples (Luo 2020, no extra decoding) or the reward of its greedy
caption (Rennie et al.).

- Rewards are computed in-process (``pipeline/scst/rewards.py``): references are
  PTB-tokenized once (Java, as the evaluation does), sampled captions by
  ``fast_ptb_tokenize``, and scored by the pipeline's one CIDEr-D
  (``pipeline.text.cider``).
- The model stays in eval mode (no dropout): the log-probabilities weighed by the
  reward must be those of the policy that sampled the captions.
- Sampling is plain multinomial sampling from the full distribution (temperature 1,
  no top-k/top-p), as the policy gradient assumes, through the decoding module that
  generate and caption use (``pipeline/text/decoding.py``): each caption is drawn
  from a generator seeded by (``scst.seed``, epoch, image, index), so the samples do
  not depend on the batch or on the number of processes.
- After each epoch (and before the first, for the cross-entropy model) the greedy
  captions of the val split are scored with CIDEr-D (pycocoevalcap's definition,
  document frequencies from the val references); the best epoch's weights are the
  stage's output, so SCST never hands on a model worse on val than it was given.
- ``epochs: 0`` copies the cross-entropy model folder through unchanged.

``ScstJob`` says what a step computes; the loop (global batches of
``scst.batch_size`` images, DDP, mixed precision, checkpoints, resume, best
weights) is ``pipeline/train/loop.py``'s, shared with cross-entropy training.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.formats.features import FeatureShardError
from pipeline.core.files import replace_dir, temp_dir_for, write_csv, write_metrics
from pipeline.train.loop import check_batch_size, rounded, run_job, sum_across
from pipeline.models.captioner import CLIP_SUBDIR, ClipCaptioner
from pipeline.text.decoding import check_room, decode_batch, generate_ids
from pipeline.core.params import Decoding, ParamsError, ScstParams
from pipeline.core.runtime import Rank, autocast, choose_device, choose_precision, current_rank, gather, process_group
from pipeline.models.prompt import pad_left
from pipeline.retrieval.neighbours import shard_neighbours
from pipeline.scst.rewards import (Reward, Split, advantages, caption_mask, corpus_cider, load_split, split_rows,
                                   tokenize_references, tokenizer_agreement)

log = logging.getLogger(__name__)
REWARD_FIELDS = ("step", "epoch", "reward", "baseline_reward", "loss", "sample_tokens")
VAL_FIELDS = ("epoch", "val_cider", "sample_reward")
# Params that do not change the trajectory: a checkpoint made with other values resumes.
NOT_IDENTITY = ("checkpoint_every", "log_every")


# ------------------------------------------------------------------- validation
def greedy_captions(model: ClipCaptioner, vectors: torch.Tensor, batch_size: int, d: Decoding, device: torch.device,
                    amp: str, prompts: Optional[list] = None) -> list[str]:
    """One caption per vector, decoded as ``d`` says (greedy: no seed, so no keys needed);
    ``prompts``: a retrieval captioner's prompt ids of each vector."""
    out: list[str] = []
    for lo in range(0, len(vectors), batch_size):
        batch = vectors[lo:lo + batch_size].to(device)
        part = None if prompts is None else prompts[lo:lo + batch_size]
        with autocast(device, amp):
            out += [c[0].text for c in decode_batch(model, batch, d, keys=[""] * len(batch), prompts=part)]
    return out


# --------------------------------------------------------------------- the stage
def scst(
    model_dir: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    curve_path: str | Path,
    val_curve_path: str | Path,
    metrics_path: str | Path,
    params: ScstParams,
    progress: bool = True,
    *,
    checkpoint_dir: str | Path | None = None,
    stop_after: Optional[int] = None,
    device: str = "auto",
    retrieval_dir: str | Path | None = None,
) -> dict:
    """Fine-tune the captioner in ``model_dir`` with SCST; write the best model, curves and metrics.

    ``checkpoint_dir``: where checkpoints go and are resumed from (None: a temporary
    folder, so no resume); they are removed when the run ends well. ``stop_after``:
    raise ``pipeline.train.loop.Stopped`` after that many steps, as a kill would (tests).
    ``retrieval_dir``: the neighbour shards a retrieval captioner's prompts come from (the
    same prompts as in training, for sampling, baseline and validation).
    """
    started = time.perf_counter()
    rank = current_rank()
    if params.epochs == 0:
        if rank.is_main:
            _pass_through(Path(model_dir), Path(out_dir))
            write_csv(curve_path, REWARD_FIELDS, [])
            write_csv(val_curve_path, VAL_FIELDS, [])
        metrics = {"epochs": 0, "passed_through": True, "seconds": round(time.perf_counter() - started, 2)}
        if rank.is_main:
            write_metrics(metrics_path, metrics)
        return metrics
    device = choose_device(device, rank, key="device")
    with process_group(rank, device):
        job = ScstJob(Path(model_dir), Path(features_dir), params, rank, device, retrieval_dir)
        job.outputs(Path(out_dir), Path(curve_path), Path(val_curve_path), Path(metrics_path), started)
        return run_job(job, rank, device, checkpoint_dir, progress, stop_after)


class ScstJob:
    """SCST as a job of ``pipeline.train.loop``: rewards, the model in eval mode, validation CIDEr-D."""

    name = "scst"
    validate_first = True  # epoch 0: the cross-entropy model's val CIDEr-D, a candidate for the output
    train_mode = False  # no dropout: the scored log-probabilities are those of the sampling policy
    keep_best = True
    grad_accum = 1
    eval_every = 0
    patience = 0

    def __init__(self, model_dir: Path, features_dir: Path, params: ScstParams, rank: Rank,
                 device: torch.device, retrieval_dir=None) -> None:
        from pipeline.core.checkpoint import digest_files
        from pipeline.text.java import require_java
        from pipeline.formats.features import load_features

        check_batch_size("scst", params.batch_size, rank.world_size)
        self.java = require_java()
        self.amp = choose_precision(params.precision, device, key="scst.precision")
        torch.manual_seed(params.seed)

        model = ClipCaptioner.load(model_dir, device=device)
        table = load_features(features_dir, expect=model.feature_expectation(), dataset=model.feature_dataset)
        model.check_features(table.attrs, int(table.embeddings.shape[-1]), str(features_dir))
        splits = np.asarray(table.splits)
        train_vectors, train_refs = load_split(table, splits == "train")
        val_vectors, val_refs = load_split(table, splits == "val")
        if len(train_refs) == 0:
            raise FeatureShardError(f"{features_dir}: no training image with a reference caption")
        tokenized = tokenize_references(train_refs + val_refs, self.java)
        self.train = Split(train_vectors, train_refs, tokenized[:len(train_refs)])
        self.val = Split(val_vectors, val_refs, tokenized[len(train_refs):])
        self.train_prompts = self.val_prompts = None  # prompt ids of each image (retrieval)
        if model.retrieval.k > 0:
            if retrieval_dir is None:
                raise ParamsError("the model reads retrieved captions (retrieval.k > 0): pass the neighbour shards "
                                  "(--retrieval data/retrieval)")
            neighbours, _ = shard_neighbours(Path(retrieval_dir), table.keys, model.retrieval.k)
            prompts = model.prompt_ids(neighbours)
            self.train_prompts = [prompts[i] for i in split_rows(table, splits == "train")]
            self.val_prompts = [prompts[i] for i in split_rows(table, splits == "val")]
        self.reward = Reward(self.train)
        self.batches_per_epoch = len(self.train) // params.batch_size
        if self.batches_per_epoch == 0:
            raise ParamsError(f"scst.batch_size: {params.batch_size} is more than the {len(self.train)} training "
                              "images; not one full batch")

        # Decoding as generate does it (pipeline/text/decoding.py): plain sampling from the full
        # distribution, each caption seeded by (scst.seed, epoch, image, index); greedy for
        # the baseline and validation. At most scst.max_tokens, cut to GPT-2's room.
        sampling = Decoding(num_beams=1, do_sample=True, num_return_sequences=params.samples, temperature=1.0,
                            top_k=0, top_p=1.0, max_new_tokens=params.max_tokens, seed=params.seed)
        self.sampling = sampling.model_copy(
            update={"max_new_tokens": check_room(model, sampling, name=lambda key: "scst.max_tokens")})
        self.greedy = Decoding(num_beams=1, max_new_tokens=self.sampling.max_new_tokens)
        self.update_gpt = params.finetune_gpt and model.finetune_gpt
        if params.finetune_gpt and not model.finetune_gpt:
            log.info("scst: GPT-2 was frozen in training, so it stays frozen (only the mapper learns)")
        model.finetune_gpt = self.update_gpt
        model.gpt.requires_grad_(self.update_gpt)
        model.eval()
        self.model, self.params, self.rank, self.device, self.model_dir = model, params, rank, device, model_dir
        self.modules = {"mapper": model.mapper, **({"gpt": model.gpt} if self.update_gpt else {})}
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _constant)  # scst.lr throughout
        self.identity = {
            "scst": {k: v for k, v in params.model_dump().items() if k not in NOT_IDENTITY},
            "model": digest_files(model_dir),
            "features": digest_files(features_dir),
            **({"neighbours": digest_files(retrieval_dir)} if self.train_prompts is not None else {}),
            "precision": self.amp,
            "device": device.type,
        }
        self.epochs, self.batch_size = params.epochs, params.batch_size
        self.log_every, self.checkpoint_every, self.grad_clip = params.log_every, params.checkpoint_every, \
            params.grad_clip

    def outputs(self, out_dir: Path, curve_path: Path, val_curve_path: Path, metrics_path: Path,
                started: float) -> None:
        self.out_dir, self.curve_path, self.val_curve_path = out_dir, curve_path, val_curve_path
        self.metrics_path, self.started = metrics_path, started

    # ------------------------------------------------------------- steps
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches of training images: a function of (seed, epoch) only."""
        self.epoch = epoch  # part of each sample's seed
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.params.seed * 1000 + epoch))
        bs = self.batch_size
        return [order[b * bs:(b + 1) * bs].numpy() for b in range(self.batches_per_epoch)]

    def micro_batches(self, batch: np.ndarray, parts: int) -> list[np.ndarray]:
        return np.split(batch, parts)

    def global_count(self, batch: np.ndarray) -> int:
        """The global batch's sampled captions: the loss is their mean."""
        return len(batch) * self.params.samples

    def micro_loss(self, net: torch.nn.Module, images: np.ndarray) -> tuple[torch.Tensor, list]:
        """Sample, reward, and the summed ``-(reward - baseline) * log p(caption)`` of ``images``."""
        model, params, device, amp = self.model, self.params, self.device, self.amp
        images = images.tolist()
        k = params.samples
        vectors = self.train.vectors[images].to(device)
        prompts = None if self.train_prompts is None else [self.train_prompts[i] for i in images]
        with autocast(device, amp):
            ids, _ = generate_ids(model, vectors, self.sampling, keys=[f"{self.epoch}/{i}" for i in images],
                                  prompts=prompts)
        ids = ids.clone()  # out of inference mode: the loss's backward reads the ids
        owners = [i for i in images for _ in range(k)]  # an image's samples are adjacent rows
        rewards = self.reward(model.decode(ids), owners)
        greedy = None
        if params.baseline == "greedy":
            greedy = self.reward(greedy_captions(model, vectors, len(images), self.greedy, device, amp, prompts),
                                 images)
        adv = advantages(rewards, k, greedy)
        mask = caption_mask(ids, model.eos_token_id)
        # Each sample is scored with its image's prompt, as it was sampled.
        prompt = None if prompts is None else pad_left([p for p in prompts for _ in range(k)], model.pad_token_id)
        with autocast(device, amp):
            logp = net(vectors.repeat_interleave(k, dim=0), ids, mask, reduction="tokens", prompt=prompt).sum(dim=1)
        loss_sum = -(torch.as_tensor(adv, dtype=logp.dtype, device=device) * logp).sum()
        baseline = greedy if greedy is not None else rewards - adv
        stats = [float(loss_sum.detach()), len(ids), float(rewards.sum()), float(np.sum(baseline)), len(baseline),
                 int(mask.sum().item())]
        return loss_sum, stats

    def step_row(self, stats: list) -> list[float]:
        """[loss sum, captions, reward sum, baseline sum, baselines, sampled tokens] of this process."""
        return [float(sum(column)) for column in zip(*stats)]

    @staticmethod
    def step_means(row: list) -> list[float]:
        """(mean reward, mean baseline, loss, mean sample tokens) of one step's summed stats."""
        loss, captions, reward, baseline, baselines, tokens = row
        return [reward / captions, baseline / baselines, float(np.float32(loss) / np.float32(captions)),
                tokens / captions]

    def postfix(self, row: list) -> dict:
        return {"reward": f"{row[2] / row[1]:.3f}"}

    def curve_row(self, p, rows: list, lr: Optional[float]) -> dict:
        mean = np.mean([self.step_means(r) for r in rows], axis=0)
        return {"step": p.step, "epoch": p.epoch, "reward": float(mean[0]), "baseline_reward": float(mean[1]),
                "loss": float(mean[2]), "sample_tokens": float(mean[3])}

    def epoch_summary(self, rows: list) -> Optional[float]:
        """The epoch's mean sample reward (the mean of its steps')."""
        return float(np.mean([self.step_means(r)[0] for r in rows])) if rows else None

    # -------------------------------------------------------- validation
    def validate(self, p) -> tuple[Optional[float], dict]:
        """Val CIDEr-D of the greedy captions (each rank captions every world_size-th image)."""
        cider = self.val_cider()
        return cider, {"epoch": p.epoch if p.step else 0, "val_cider": cider, "sample_reward": p.epoch_summary}

    def val_cider(self) -> Optional[float]:
        if len(self.val) == 0:
            return None
        rank, world = self.rank.rank, self.rank.world_size
        prompts = None if self.val_prompts is None else self.val_prompts[rank::world]
        mine = greedy_captions(self.model, self.val.vectors[rank::world], self.batch_size * self.params.samples,
                               self.greedy, self.device, self.amp, prompts)
        captions = [None] * len(self.val)
        for r, part in enumerate(gather(mine)):
            captions[r::world] = part
        return corpus_cider(captions, self.val)

    @staticmethod
    def better(score: float, best: float) -> bool:
        return score > best

    def epoch_message(self, p) -> str:
        return (f"epoch {p.epoch}: mean sample reward {p.epoch_summary:.4f}"
                + (f"  val CIDEr-D {p.last_val:.4f}" if p.last_val is not None else ""))

    def write_curves(self, p) -> None:
        write_csv(self.curve_path, REWARD_FIELDS, p.curve)
        write_csv(self.val_curve_path, VAL_FIELDS, p.val_curve)

    # ------------------------------------------------------------ finish
    def finish(self, run, kept: str) -> dict:
        """The kept weights' model folder (with the input's CLIP), curves and metrics (rank 0)."""
        p, params = run.progress, self.params
        seconds = time.perf_counter() - self.started
        rewards = p.val_curve[1:]
        best_epoch = p.best_step // self.batches_per_epoch if kept == "best" else params.epochs
        metrics = {
            "epochs": params.epochs,
            "steps": p.step,
            "best_epoch": best_epoch,
            "val_cider_xe": rounded(p.val_curve[0]["val_cider"]),
            "val_cider_best": rounded(p.best_score),
            "val_cider_last": rounded(p.val_curve[-1]["val_cider"]),
            "reward_first_epoch": rounded(rewards[0]["sample_reward"]) if rewards else None,
            "reward_last_epoch": rounded(p.val_curve[-1]["sample_reward"]),
            "baseline": params.baseline,
            "samples": params.samples,
            "gpt_updated": self.update_gpt,
            "train_images": len(self.train),
            "val_images": len(self.val),
            "tokenizer_agreement": None,
            "world_size": run.rank.world_size,
            "precision": self.amp,
            "device": str(run.device),
            "seconds": round(seconds, 2),
            "seconds_reward": round(self.reward.seconds, 2),
            "seconds_reward_fraction": round(self.reward.seconds / max(seconds, 1e-9), 4),
            "sampled_captions_per_s": round(sum_across(self.reward.scored, run.device) / max(seconds, 1e-9), 2),
        }
        if run.rank.is_main:
            # Only rank 0 holds the kept weights: it captions the whole val split alone.
            captions = greedy_captions(self.model, self.val.vectors, self.batch_size * params.samples, self.greedy,
                                       self.device, self.amp)
            metrics["tokenizer_agreement"] = rounded(tokenizer_agreement(captions, self.java))
            # The input model's CLIP travels on, so the folder still captions on its own.
            clip = self.model_dir / CLIP_SUBDIR
            self.model.save(self.out_dir, clip_dir=clip if clip.is_dir() else None)
            self.write_curves(p)
            write_metrics(self.metrics_path, metrics)
        return metrics


def _constant(step: int) -> float:
    return 1.0


def _pass_through(model_dir: Path, out_dir: Path) -> None:
    """Copy the cross-entropy model folder, whole, to ``out_dir`` (replaced when complete)."""
    from pipeline.models.captioner import CONFIG_NAME
    from pipeline.models.pretrained import ModelError

    if not (model_dir / CONFIG_NAME).is_file():
        raise ModelError(f"{model_dir}: not a trained captioner folder (no {CONFIG_NAME}); run `capline train`")
    tmp = temp_dir_for(out_dir)
    shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp)
    replace_dir(tmp, out_dir)


