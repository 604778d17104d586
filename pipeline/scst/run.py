"""Self-critical sequence training (SCST) of a cross-entropy captioner.

Rennie et al. 2017: for each training image, sample ``samples`` captions from the
model; the reward of a caption is its CIDEr-D against that image's training
references, with document frequencies from the training split; the loss is
``-(reward - baseline) * log p(caption)`` summed over the caption's tokens (EOS
included) and averaged over the captions. The baseline is the mean reward of the
image's other samples (Luo 2020, no extra decoding) or the reward of its greedy
caption (Rennie et al.).

- Rewards are computed in-process: references are PTB-tokenized once (Java, as the
  evaluation does), sampled captions by ``fast_ptb_tokenize``, and scored by the
  pipeline's one CIDEr-D (``pipeline.text.cider``).
- The model stays in eval mode (no dropout): the log-probabilities weighed by the
  reward must be those of the policy that sampled the captions.
- Sampling is plain multinomial sampling from the full distribution (temperature 1,
  no top-k/top-p), as the policy gradient assumes.
- After each epoch (and before the first, for the cross-entropy model) the greedy
  captions of the val split are scored with CIDEr-D (pycocoevalcap's definition,
  document frequencies from the val references); the best epoch's weights are the
  stage's output, so SCST never hands on a model worse on val than it was given.
- ``epochs: 0`` copies the cross-entropy model folder through unchanged.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.core.errors import CaplineError
from pipeline.text.cider import CiderD, Vector
from pipeline.text.tokenizer import fast_ptb_tokenize
from pipeline.formats.features import FeatureShardError
from pipeline.core.files import replace_dir, temp_dir_for, write_csv, write_metrics
from pipeline.models.captioner import ClipCaptioner
from pipeline.core.params import ScstParams
from pipeline.core.runtime import autocast, choose_device, choose_precision, current_rank

log = logging.getLogger(__name__)
REWARD_FIELDS = ("step", "epoch", "reward", "baseline_reward", "loss", "sample_tokens")
VAL_FIELDS = ("epoch", "val_cider", "sample_reward")


class ScstDiverged(CaplineError):
    """The SCST loss became inf or NaN; the message says at which step and what to change."""


# ----------------------------------------------------------------------- rewards
@dataclass
class Split:
    """One split's image vectors and references (raw and PTB-tokenized)."""

    vectors: torch.Tensor  # [images, D]
    references: list[list[str]]
    tokenized: list[list[str]]

    def __len__(self) -> int:
        return len(self.references)


def load_split(table, select: np.ndarray) -> tuple[torch.Tensor, list[list[str]]]:
    """Vectors and non-blank references of the selected rows that have any."""
    rows = [i for i in np.flatnonzero(select) if any(c and c.strip() for c in table.captions[i])]
    vectors = torch.from_numpy(np.ascontiguousarray(table.embeddings[rows], dtype=np.float32)) if rows \
        else torch.zeros((0, table.embeddings.shape[1]))
    return vectors, [[c for c in table.captions[i] if c and c.strip()] for i in rows]


def tokenize_references(groups: list[list[str]], java: str) -> list[list[str]]:
    """PTB-tokenize every reference in one Java call (exactly as the evaluation does)."""
    from pipeline.text.tokenizer import ptb_tokenize

    flat = iter(ptb_tokenize([c for group in groups for c in group], java=java))
    return [[next(flat) for _ in group] for group in groups]


class Reward:
    """CIDEr-D of captions against their image's training references (training-split df)."""

    def __init__(self, train: Split) -> None:
        self.train = train
        self.cider = CiderD(train.tokenized)
        self.seconds = 0.0
        self.scored = 0

    def __call__(self, captions: list[str], images: list[int]) -> np.ndarray:
        """Reward of caption i (raw text) for training image images[i]."""
        started = time.perf_counter()
        refs: dict[int, list[Vector]] = {i: self.cider.vectors(self.train.tokenized[i]) for i in set(images)}
        out = self.cider.scores([fast_ptb_tokenize(c) for c in captions], [refs[i] for i in images])
        self.seconds += time.perf_counter() - started
        self.scored += len(captions)
        return out


def advantages(rewards: np.ndarray, samples: int, baseline: Optional[np.ndarray] = None) -> np.ndarray:
    """reward - baseline for rewards [images * samples] (an image's samples adjacent).

    ``baseline`` [images] (the greedy captions' rewards) or, when None, the mean of
    each image's other samples: b_ij = (sum_k r_ik - r_ij) / (samples - 1).
    """
    r = rewards.reshape(-1, samples)
    if baseline is None:
        if samples < 2:
            raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
        b = (r.sum(axis=1, keepdims=True) - r) / (samples - 1)
    else:
        b = np.repeat(np.asarray(baseline, dtype=np.float64)[:, None], samples, axis=1)
    return (r - b).reshape(-1)


def caption_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for each token up to and including the first EOS of its row (all of a row without one)."""
    is_eos = (ids == eos_id).long()
    before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (before == 0).long()


# ------------------------------------------------------------------- validation
def greedy_captions(model: ClipCaptioner, vectors: torch.Tensor, batch_size: int, max_tokens: int,
                    device: torch.device, amp: str) -> list[str]:
    out: list[str] = []
    for lo in range(0, len(vectors), batch_size):
        with torch.inference_mode(), autocast(device, amp):
            out += model.caption(vectors[lo:lo + batch_size].to(device), num_beams=1, max_new_tokens=max_tokens)
    return out


def val_cider(model: ClipCaptioner, val: Split, params: ScstParams, device: torch.device, amp: str,
              reward: Reward) -> tuple[Optional[float], list[str]]:
    """Corpus CIDEr-D of the greedy val captions (document frequencies from the val references)."""
    if len(val) == 0:
        return None, []
    captions = greedy_captions(model, val.vectors, params.batch_size * params.samples, params.max_tokens, device, amp)
    scorer = CiderD(val.tokenized)
    per_image = [scorer.score(fast_ptb_tokenize(c), scorer.vectors(refs)) for c, refs in zip(captions, val.tokenized)]
    return float(np.mean(per_image)), captions


# ------------------------------------------------------------------------ state
# Params that do not change the trajectory: a checkpoint made with other values resumes.
NOT_IDENTITY = ("checkpoint_every", "log_every")


class Stopped(Exception):
    """Raised by ``stop_after`` (tests): the run ends as a kill would, checkpoints kept."""


@dataclass
class Progress:
    """Everything besides weights and optimizer that a resumed run needs (JSON-able)."""

    epoch: int = 0  # epochs finished
    position: int = 0  # steps done in the current epoch
    step: int = 0
    curve: list[dict] = field(default_factory=list)
    val_curve: list[dict] = field(default_factory=list)
    window: list[list[float]] = field(default_factory=list)  # stats since the last curve point
    epoch_rewards: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_cider: Optional[float] = None
    val_xe: Optional[float] = None


def _trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights SCST changes, as ``{module/key: tensor}``."""
    return {f"{name}/{k}": v.detach().to("cpu", copy=True) for name, m in modules.items()
            for k, v in m.state_dict().items()}


def _load_trainable(modules: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        prefix = f"{name}/"
        m.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)


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
) -> dict:
    """Fine-tune the captioner in ``model_dir`` with SCST; write the best model, curves and metrics.

    ``checkpoint_dir``: where checkpoints go and are resumed from (None: a temporary
    folder, so no resume); they are removed when the run ends well. ``stop_after``:
    raise ``Stopped`` after that many steps, as a kill would (tests).
    """
    import tempfile

    rank = current_rank()
    if rank.world_size > 1:
        raise CaplineError("scst: runs in one process (start it without torchrun)")
    started = time.perf_counter()
    if params.epochs == 0:
        _pass_through(Path(model_dir), Path(out_dir))
        write_csv(curve_path, REWARD_FIELDS, [])
        write_csv(val_curve_path, VAL_FIELDS, [])
        metrics = {"epochs": 0, "passed_through": True, "seconds": round(time.perf_counter() - started, 2)}
        write_metrics(metrics_path, metrics)
        return metrics

    temp = None
    if checkpoint_dir is None:
        temp = tempfile.mkdtemp(prefix="capline-scst-checkpoints-")
        checkpoint_dir = temp
    try:
        return _run(Path(model_dir), Path(features_dir), Path(out_dir), Path(curve_path), Path(val_curve_path),
                    Path(metrics_path), params, progress, Path(checkpoint_dir), stop_after, started, device)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _run(model_dir: Path, features_dir: Path, out_dir: Path, curve_path: Path, val_curve_path: Path,
         metrics_path: Path, params: ScstParams, progress: bool, checkpoint_dir: Path,
         stop_after: Optional[int], started: float, device: str = "auto") -> dict:
    from tqdm import tqdm

    from pipeline.core.checkpoint import Checkpoints, capture_rng, digest_files, restore_rng
    from pipeline.text.java import require_java
    from pipeline.formats.features import load_features

    java = require_java()
    device = choose_device(device, current_rank(), key="device")
    amp = choose_precision(params.precision, device, key="scst.precision")
    torch.manual_seed(params.seed)

    model = ClipCaptioner.load(model_dir, device=device)
    table = load_features(features_dir, expect=model.feature_expectation())
    model.check_features(table.attrs, int(table.embeddings.shape[1]), str(features_dir))
    splits = np.asarray(table.splits)
    train_vectors, train_refs = load_split(table, splits == "train")
    val_vectors, val_refs = load_split(table, splits == "val")
    if len(train_refs) == 0:
        raise FeatureShardError(f"{features_dir}: no training image with a reference caption")
    tokenized = tokenize_references(train_refs + val_refs, java)
    train = Split(train_vectors, train_refs, tokenized[:len(train_refs)])
    val = Split(val_vectors, val_refs, tokenized[len(train_refs):])
    reward = Reward(train)

    update_gpt = params.finetune_gpt and model.finetune_gpt
    if params.finetune_gpt and not model.finetune_gpt:
        log.info("scst: GPT-2 was frozen in training, so it stays frozen (only the mapper learns)")
    model.finetune_gpt = update_gpt
    model.gpt.requires_grad_(update_gpt)
    model.eval()  # no dropout: the scored log-probabilities are those of the sampling policy
    learning = {"mapper": model.mapper, **({"gpt": model.gpt} if update_gpt else {})}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    stateful = {"optimizer": optimizer, **({"scaler": scaler} if scaler is not None else {})}

    identity = {
        "scst": {k: v for k, v in params.model_dump().items() if k not in NOT_IDENTITY},
        "model": digest_files(model_dir),
        "features": digest_files(features_dir),
        "precision": amp,
        "device": device.type,
    }
    ckpts = Checkpoints(checkpoint_dir, identity, keep=2)
    xe_weights = _trainable_state(learning)
    best_weights = xe_weights
    found = ckpts.latest()
    if found is not None:
        state = found.restore(modules=learning, stateful=stateful)
        best = state.pop("best_weights", None)
        state_progress = Progress(**state)
        restore_rng(found.rng[0])
        if best is not None:
            best_weights = best
        log.info("scst: resumed from %s (epoch %d, step %d)", found.path, state_progress.epoch, state_progress.step)
        prog = state_progress
    else:
        ckpts.remove("step")  # another run's checkpoints (logged above): this run replaces them
        prog = Progress()
        prog.val_xe, _ = val_cider(model, val, params, device, amp, reward)
        prog.best_cider = prog.val_xe
        prog.val_curve.append({"epoch": 0, "val_cider": prog.val_xe, "sample_reward": None})

    def checkpoint() -> None:
        state = {k: v for k, v in prog.__dict__.items()}
        if prog.best_epoch > 0:
            state["best_weights"] = best_weights
        ckpts.save(prog.step, modules=learning, stateful=stateful, state=state, rng=[capture_rng()])

    steps_per_epoch = math.ceil(len(train) / params.batch_size)
    bar = tqdm(total=steps_per_epoch * params.epochs, initial=prog.step, desc="scst", unit="step",
               disable=not progress)
    while prog.epoch < params.epochs:
        epoch = prog.epoch + 1
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(params.seed * 1000 + epoch))
        for b in range(prog.position, steps_per_epoch):
            images = order[b * params.batch_size:(b + 1) * params.batch_size].tolist()
            stats = _step(model, train, images, reward, params, optimizer, scaler, trainable, device, amp)
            if not math.isfinite(stats[2]):
                raise ScstDiverged(f"scst: loss is {stats[2]} at step {prog.step + 1} (epoch {epoch}); "
                                   "lower scst.lr or use scst.precision fp32")
            prog.step += 1
            prog.position = b + 1
            prog.window.append(list(stats))
            prog.epoch_rewards.append(stats[0])
            bar.update(1)
            bar.set_postfix(epoch=epoch, reward=f"{stats[0]:.3f}")
            if prog.step % params.log_every == 0 or b == steps_per_epoch - 1:
                mean = np.mean(prog.window, axis=0)
                prog.curve.append({"step": prog.step, "epoch": epoch, "reward": float(mean[0]),
                                   "baseline_reward": float(mean[1]), "loss": float(mean[2]),
                                   "sample_tokens": float(mean[3])})
                prog.window = []
            if params.checkpoint_every and prog.step % params.checkpoint_every == 0 and b < steps_per_epoch - 1:
                checkpoint()
            if stop_after is not None and prog.step >= stop_after:
                raise Stopped(f"stopped after {prog.step} steps")
        cider, _ = val_cider(model, val, params, device, amp, reward)
        prog.val_curve.append({"epoch": epoch, "val_cider": cider, "sample_reward": float(np.mean(prog.epoch_rewards))})
        if cider is None or prog.best_cider is None or cider > prog.best_cider:
            # Without a val split the last epoch is kept.
            prog.best_cider, prog.best_epoch, best_weights = cider, epoch, _trainable_state(learning)
        prog.epoch, prog.position, prog.epoch_rewards = epoch, 0, []
        write_csv(curve_path, REWARD_FIELDS, prog.curve)
        write_csv(val_curve_path, VAL_FIELDS, prog.val_curve)
        checkpoint()
        bar.write(f"epoch {epoch}: mean sample reward {prog.val_curve[-1]['sample_reward']:.4f}"
                  + (f"  val CIDEr-D {cider:.4f}" if cider is not None else ""))
    bar.close()

    _load_trainable(learning, best_weights)
    _, captions = val_cider(model, val, params, device, amp, reward)
    agreement = _tokenizer_agreement(captions, java)
    # The input model's CLIP travels on, so the folder still captions on its own.
    from pipeline.models.captioner import CLIP_SUBDIR

    clip = model_dir / CLIP_SUBDIR
    model.save(out_dir, clip_dir=clip if clip.is_dir() else None)
    write_csv(curve_path, REWARD_FIELDS, prog.curve)
    write_csv(val_curve_path, VAL_FIELDS, prog.val_curve)
    seconds = time.perf_counter() - started
    metrics = {
        "epochs": params.epochs,
        "steps": prog.step,
        "best_epoch": prog.best_epoch,
        "val_cider_xe": _round(prog.val_xe),
        "val_cider_best": _round(prog.best_cider),
        "val_cider_last": _round(prog.val_curve[-1]["val_cider"]),
        "reward_first_epoch": _round(prog.val_curve[1]["sample_reward"]) if len(prog.val_curve) > 1 else None,
        "reward_last_epoch": _round(prog.val_curve[-1]["sample_reward"]),
        "baseline": params.baseline,
        "samples": params.samples,
        "gpt_updated": update_gpt,
        "train_images": len(train),
        "val_images": len(val),
        "tokenizer_agreement": _round(agreement),
        "precision": amp,
        "device": str(device),
        "seconds": round(seconds, 2),
        "seconds_reward": round(reward.seconds, 2),
        "reward_fraction": round(reward.seconds / max(seconds, 1e-9), 4),
        "sampled_captions_per_s": round(reward.scored / max(seconds, 1e-9), 2),
    }
    write_metrics(metrics_path, metrics)
    ckpts.remove("step")  # the run is done: nothing left to resume
    return metrics


def _step(model: ClipCaptioner, train: Split, images: list[int], reward: Reward, params: ScstParams,
          optimizer: torch.optim.Optimizer, scaler, trainable: list, device: torch.device,
          amp: str) -> tuple[float, float, float, float]:
    """One SCST update on ``images``; returns (mean reward, mean baseline, loss, mean sample tokens)."""
    k = params.samples
    vectors = train.vectors[images].to(device)
    with torch.no_grad(), autocast(device, amp):
        ids = model.generate_ids(vectors, do_sample=True, num_return_sequences=k, max_new_tokens=params.max_tokens,
                                 num_beams=1, temperature=1.0, top_k=0, top_p=1.0)
    owners = [i for i in images for _ in range(k)]  # generate returns an image's samples adjacent
    rewards = reward(model.decode(ids), owners)
    greedy = None
    if params.baseline == "greedy":
        with torch.no_grad(), autocast(device, amp):
            greedy_ids = model.generate_ids(vectors, num_beams=1, max_new_tokens=params.max_tokens)
        greedy = reward(model.decode(greedy_ids), images)
    adv = advantages(rewards, k, greedy)
    mask = caption_mask(ids, model.eos_token_id)
    with autocast(device, amp):
        logp = model.token_logprobs(vectors.repeat_interleave(k, dim=0), ids, mask).sum(dim=1)
    loss = -(torch.as_tensor(adv, dtype=logp.dtype, device=device) * logp).mean()
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if params.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    base = float(np.mean(greedy)) if greedy is not None else float(np.mean(rewards - adv))
    return float(rewards.mean()), base, float(loss.item()), float(mask.sum().item() / len(ids))


def _tokenizer_agreement(captions: list[str], java: str) -> Optional[float]:
    """Share of captions that fast_ptb_tokenize splits exactly as the Java PTB tokenizer."""
    from pipeline.text.tokenizer import ptb_tokenize

    if not captions:
        return None
    java_tokens = ptb_tokenize(captions, java=java)
    return sum(fast_ptb_tokenize(c) == t for c, t in zip(captions, java_tokens)) / len(captions)


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


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)
