"""Benchmark of the training step against a ClipCap-style training loop.

Both train the transformer mapper (8 layers, prefix 10, clip_length 10, 512-d CLIP
vectors) in front of a frozen GPT-2 small built from its default config (random
weights: the same compute as trained ones), batch 40, on captions whose lengths
are drawn to match COCO's (GPT-2 tokens: mean 11, sd 3, plus EOS).

  ours:          pipeline.train.loop's step (XeJob.micro_loss, one process) on batches from pipeline.train.data
                 (collate: padded to the batch's longest caption; length bucketing
                 as in configs/coco-karpathy.yaml; precision "auto" as the train stage
                 resolves it; LM head only on caption positions; no GPT-2 weight
                 gradients);
  clipcap_loop:  ClipCap's train loop (Mokady et al., train.py, --only_prefix): every
                 caption padded to 40 tokens, fp32, no bucketing, GPT-2 logits on the
                 whole sequence, loss masked with ignore_index=0 as ClipCap does; GPT-2
                 left with requires_grad (its parameters are only left out of the
                 optimizer), so its weight gradients are computed.

  xattn:         our step with the cross_attention mapper instead (SmallCap: ViT-B/32's
                 50 x 768 patch tokens, reduce factor 4, the same frozen GPT-2 and the
                 same batches of captions), against "ours" (the prefix mapper).

It first checks that both losses agree on a batch where no padding is needed (every
caption 40 tokens, no token id 0), then times steps of each, alternating, and
reports samples/s, tokens/s and the fraction of this machine's measured matmul rate,
in the precision our step runs in (bf16 or fp32), that our step reaches. The last line printed is a JSON object.

    python bench/train.py [--steps 4] [--rounds 2] [--batch-size 40] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.captioner import ClipCaptioner
from pipeline.core.params import MapperParams, TrainParams
from pipeline.core.runtime import choose_precision
from pipeline.core.runtime import autocast
from pipeline.train.run import make_optimizer
from pipeline.train.data import BUCKET_BATCHES, Captions, MemoryVectors, collate

CLIP_DIM, FIXED_LEN, PREFIX = 512, 40, 10
MAPPER = MapperParams(type="transformer", prefix_length=PREFIX, clip_length=10, layers=8, heads=8)
XATTN = MapperParams(type="cross_attention", prefix_length=1, reduce_factor=4)
PATCH_TOKENS, PATCH_WIDTH, PATCH_IMAGES = 50, 768, 256  # ViT-B/32; images the captions' rows cycle over


def our_step(model, opt, scaler, trainable, batch, global_tokens: int, device, amp: str) -> int:
    """pipeline.train.loop.optimizer_step's arithmetic for one process and one micro-batch; returns its tokens."""
    vectors, ids, mask = batch
    opt.zero_grad(set_to_none=True)
    with autocast(device, amp):
        loss_sum = model(vectors.to(device), ids.to(device), mask.to(device), reduction="sum")
    scaler.scale(loss_sum * (1.0 / global_tokens)).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    scaler.step(opt)
    scaler.update()
    float(loss_sum)  # the loop's one device sync per step
    return int(mask.sum())


class _Tok:
    eos_token_id = 50256
    pad_token_id = None


def build(seed: int = 0, mapper: MapperParams = MAPPER, clip_dim: int = CLIP_DIM) -> ClipCaptioner:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(GPT2Config())
    return ClipCaptioner.from_settings(mapper.model_dump(), clip_dim, gpt, _Tok(), finetune_gpt=False)


def coco_like(n: int, seed: int = 0) -> Captions:
    """n captions, GPT-2 token lengths ~ N(11, 3) clipped to 3..39, then EOS; no id 0."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.normal(11, 3, size=n)), 3, FIXED_LEN - 1).astype(np.int64) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(1, 50256, size=int(offsets[-1])).astype(np.int32)
    flat[offsets[1:] - 1] = _Tok.eos_token_id
    return Captions(rows=np.arange(n, dtype=np.int64), offsets=offsets, flat=flat)


# ----------------------------------------------------------- ClipCap-style
class ClipCapStyle(nn.Module):
    """ClipCaptionPrefix's forward: GPT-2 on cat(prefix, wte(tokens)), logits everywhere."""

    def __init__(self, model: ClipCaptioner) -> None:
        super().__init__()
        self.mapper, self.gpt = model.mapper, model.gpt

    def forward(self, tokens, prefix, mask):
        embedding_text = self.gpt.transformer.wte(tokens)
        prefix_projections = self.mapper(prefix)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        return self.gpt(inputs_embeds=embedding_cat, attention_mask=mask).logits


def clipcap_batch(caps: Captions, vectors: torch.Tensor, idx: np.ndarray):
    """ClipCapDataset.pad_tokens: -1 padding to a fixed length, mask = tokens >= 0, then 0s."""
    tokens = torch.full((len(idx), FIXED_LEN), -1, dtype=torch.long)
    for j, i in enumerate(idx):
        t = torch.from_numpy(caps.tokens(int(i)).astype(np.int64))[:FIXED_LEN]
        tokens[j, :len(t)] = t
    mask = tokens.ge(0)
    tokens[~mask] = 0
    mask = torch.cat((torch.ones(len(idx), PREFIX), mask.float()), dim=1)
    return tokens, vectors[torch.from_numpy(caps.rows[idx])], mask


def clipcap_loss(net: ClipCapStyle, tokens, prefix, mask):
    logits = net(tokens, prefix, mask)[:, PREFIX - 1: -1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)


def clipcap_step(net, optimizer, scheduler, batch):
    net.zero_grad()
    loss = clipcap_loss(net, *batch)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss


# --------------------------------------------------------------- helpers
def bucketed(caps: Captions, batch: int, count: int, seed: int) -> list[np.ndarray]:
    """Batches as train_data.epoch_batches makes them with train.bucket_by_length."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(caps))[:count * batch].reshape(count, batch)
    out = []
    for c in range(0, count, BUCKET_BATCHES):
        chunk = order[c:c + BUCKET_BATCHES].reshape(-1)
        chunk = chunk[np.argsort(caps.lengths[chunk], kind="stable")].reshape(-1, batch)
        out.append(chunk[rng.permutation(len(chunk))])
    return list(np.concatenate(out))


def matmul_rate(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t0)


def step_flops(model: ClipCaptioner, caption_tokens: float, batch: int) -> float:
    """Matmul FLOPs of one of our steps (frozen GPT-2: input gradients only, 2 x forward;
    the mapper: 3 x forward). Attention score FLOPs are included; embeddings are not."""
    cfg = model.gpt.config
    d, layers, vocab = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    seq = PREFIX + caption_tokens / batch
    per_token = layers * (12 * d * d + 2 * seq * d) * 2  # qkv/proj/mlp + scores/values, x2 mul-add
    gpt_fwd = batch * seq * per_token + caption_tokens * 2 * d * vocab
    mc = model.mapper.config
    m_tokens = mc.clip_length + mc.prefix_length
    m_width = mc.width
    mapper_fwd = batch * (2 * CLIP_DIM * mc.clip_length * m_width
                          + mc.layers * m_tokens * 2 * (4 * m_width**2 + 2 * m_width * int(m_width * mc.mlp_ratio)))
    return 2 * gpt_fwd + 3 * mapper_fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-xattn", action="store_true", help="skip the cross_attention mapper's case")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    amp = choose_precision(args.precision, device, key="--precision")
    bs = args.batch_size

    model = build()
    caps = coco_like(bs * 200)
    vectors = MemoryVectors(np.random.default_rng(1).normal(size=(len(caps), CLIP_DIM)).astype(np.float32))
    model.train()

    # 1. The losses agree where no padding is needed (every caption FIXED_LEN tokens).
    full = coco_like(8, seed=3)
    full.offsets = np.arange(0, 9 * FIXED_LEN, FIXED_LEN, dtype=np.int64)
    full.flat = np.random.default_rng(4).integers(1, 50256, size=8 * FIXED_LEN).astype(np.int32)
    full_vec = MemoryVectors(np.random.default_rng(5).normal(size=(8, CLIP_DIM)).astype(np.float32))
    idx = np.arange(8)
    with torch.no_grad():
        v, ids, m = collate(full, full_vec, idx, model.pad_token_id)
        ours_loss = float(model(v, ids, m))
        cc = ClipCapStyle(model)
        tokens, prefix, mask = clipcap_batch(full, full_vec.vectors, idx)
        ref_loss = float(clipcap_loss(cc, tokens, prefix, mask))
    agree = abs(ours_loss - ref_loss) <= 1e-4 * abs(ref_loss)
    print(f"loss on an unpadded batch: ours {ours_loss:.6f}, ClipCap-style {ref_loss:.6f} "
          f"({'agree' if agree else 'DIFFER'})")
    if not agree:
        raise SystemExit("the two losses differ on an unpadded batch")

    # 2. Optimizers as each loop builds them.
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, TrainParams(lr=2e-5), device)
    sched = get_linear_schedule_with_warmup(opt, 5000, 10**6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    base = build()  # a second copy for the ClipCap loop, GPT-2 weights requiring grad as there
    base.gpt.requires_grad_(True)
    cc = ClipCapStyle(base)
    cc.train()
    cc.gpt.eval()
    cc_opt = torch.optim.AdamW(cc.mapper.parameters(), lr=2e-5)
    cc_sched = get_linear_schedule_with_warmup(cc_opt, 5000, 10**6)

    # Bucketed batches differ in length; the timed ones are spread evenly over the lengths
    # of an epoch (one every len/steps, in order of length), so their mean is the epoch's.
    ours_batches = sorted(bucketed(caps, bs, len(caps) // bs, seed=0), key=lambda b: int(caps.lengths[b].max()))
    stride = max(1, len(ours_batches) // max(1, args.steps))
    ours_batches = [ours_batches[(stride // 2 + k * stride) % len(ours_batches)] for k in range(args.steps)]
    plain = np.random.default_rng(2).permutation(len(caps))[: (len(caps) // bs) * bs].reshape(-1, bs)
    counter = {"ours": 0, "cc": 0}

    def run_ours(n: int) -> tuple[float, int, int]:
        samples = tokens = 0
        t0 = time.perf_counter()
        for _ in range(n):
            b = ours_batches[counter["ours"] % len(ours_batches)]  # each round: the same spread
            counter["ours"] += 1
            batch = collate(caps, vectors, b, model.pad_token_id)
            t = our_step(model, opt, scaler, trainable, batch, int(caps.lengths[b].sum()), device, amp)
            sched.step()
            samples += len(b)
            tokens += t
        return time.perf_counter() - t0, samples, tokens

    def run_cc(n: int) -> tuple[float, int, int]:
        samples = tokens = 0
        t0 = time.perf_counter()
        for _ in range(n):
            b = plain[counter["cc"] % len(plain)]
            counter["cc"] += 1
            clipcap_step(cc, cc_opt, cc_sched, clipcap_batch(caps, vectors.vectors, b))
            samples += len(b)
            tokens += int(caps.lengths[b].sum())
        return time.perf_counter() - t0, samples, tokens

    # The cross_attention mapper on the same batches of captions, patch tokens instead of vectors.
    xmodel = build(mapper=XATTN, clip_dim=PATCH_WIDTH)
    xmodel.train()
    xtrainable = [p for p in xmodel.parameters() if p.requires_grad]
    xopt = make_optimizer(xtrainable, TrainParams(lr=1e-4), device)
    xcaps = Captions(rows=caps.rows % PATCH_IMAGES, offsets=caps.offsets, flat=caps.flat)
    xtokens = MemoryVectors(np.random.default_rng(6).normal(size=(PATCH_IMAGES, PATCH_TOKENS, PATCH_WIDTH))
                            .astype(np.float16))

    def run_xattn(n: int) -> tuple[float, int, int]:
        samples = tokens = 0
        t0 = time.perf_counter()
        for _ in range(n):
            b = ours_batches[counter["xattn"] % len(ours_batches)]  # the batches "ours" times
            counter["xattn"] += 1
            batch = collate(xcaps, xtokens, b, xmodel.pad_token_id)
            tokens += our_step(xmodel, xopt, scaler, xtrainable, batch, int(caps.lengths[b].sum()), device, amp)
            samples += len(b)
        return time.perf_counter() - t0, samples, tokens

    counter["xattn"] = 0
    run_ours(2)  # warm-up (first calls allocate and pick kernels)
    run_cc(1)
    xattn_rates: list[float] = []
    if not args.no_xattn:
        run_xattn(1)
        counter["xattn"] = 0
    ours_rates, cc_rates, ours_tok_rates, cc_tok_rates, ours_tokens = [], [], [], [], []
    for r in range(args.rounds):
        s, n, t = run_ours(args.steps)
        ours_rates.append(n / s)
        ours_tok_rates.append(t / s)
        ours_tokens.append(t / args.steps)
        s, n, t = run_cc(args.steps)
        cc_rates.append(n / s)
        cc_tok_rates.append(t / s)
        if not args.no_xattn:
            s, n, t = run_xattn(args.steps)
            xattn_rates.append(n / s)
        print(f"round {r + 1}: ours {ours_rates[-1]:.2f} samples/s, ClipCap-style loop {cc_rates[-1]:.2f} samples/s"
              + (f", cross_attention {xattn_rates[-1]:.2f} samples/s" if xattn_rates else ""))

    ours, ref = statistics.median(ours_rates), statistics.median(cc_rates)
    bf16_rate = matmul_rate(torch.bfloat16)
    fp32_rate = matmul_rate(torch.float32)
    used_rate = {"bf16": bf16_rate, "fp32": fp32_rate}[amp]  # the matmuls our step runs
    flops = step_flops(model, statistics.mean(ours_tokens), bs)
    achieved = flops * ours / bs
    result = {
        "bench": "train",
        "unit": "samples/s",
        "ours": round(ours, 2),
        "clipcap_loop": round(ref, 2),
        "ratio_vs_clipcap_loop": round(ours / ref, 2),
        "ours_tokens_per_s": round(statistics.median(ours_tok_rates), 1),
        "clipcap_loop_tokens_per_s": round(statistics.median(cc_tok_rates), 1),
        "ours_precision": amp,
        "batch_size": bs,
        "mean_caption_tokens": round(float(caps.lengths.mean()), 2),
        "ours_tflops": round(achieved / 1e12, 3),
        "bf16_matmul_tflops": round(bf16_rate / 1e12, 3),
        "fp32_matmul_tflops": round(fp32_rate / 1e12, 3),
        "matmul_precision": amp,
        "fraction_of_matmul_rate": round(achieved / used_rate, 3) if used_rate > 0 else None,
        "rounds": {"ours": [round(x, 2) for x in ours_rates], "clipcap_loop": [round(x, 2) for x in cc_rates]},
        "threads": torch.get_num_threads(),
        "losses_agree_unpadded": agree,
    }
    if xattn_rates:
        xattn = statistics.median(xattn_rates)
        result["xattn_samples_per_s"] = round(xattn, 2)
        result["ratio_xattn_vs_prefix"] = round(xattn / ours, 2)
        result["xattn_trainable_params"] = sum(p.numel() for p in xtrainable)
        result["rounds"]["xattn"] = [round(x, 2) for x in xattn_rates]
        print(f"cross_attention mapper (50 x 768 patch tokens, reduce factor 4): {xattn:.2f} samples/s, "
              f"x{result['ratio_xattn_vs_prefix']} the prefix mapper's {ours:.2f} on the same batches")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
