"""Benchmark of caption generation against the ways it is usually done.

GPT-2 small built from its default config and an MLP mapper over 512-d CLIP
vectors making prefixes of length 10 (random weights: the same compute as trained
ones); beam 5 and exactly --tokens new tokens (min = max, so every method does the
same number of steps). In one run it measures:
  (a) ours: the generate stage's code path (pipeline.text.decoding.decode_batch) with the
      stage's default settings: GenerateParams' batch_size and precision ``auto``
      (bf16 weights with an fp32 LM head where the CPU has avx512_bf16/AMX);
  (b) transformers' ``generate``, one image at a time, fp32;
  (c) ClipCap's generate_beam, one image at a time, re-running GPT-2 on the whole
      sequence at every step (no KV cache), fp32.
  (d) the cross_attention mapper (SmallCap: ViT-B/32's 50 x 768 patch tokens, reduce
      factor 4) on the same GPT-2 and path, with each image's cross-attention keys and
      values shared by its beams, and copied to every beam (as passing
      ``encoder_hidden_states`` to generate would), checking that both give the same captions.
The methods run in interleaved rounds, so a machine whose load changes during the
run slows them alike. It checks that our path in fp32 gives the same captions as
(b), counts how many of our default-precision captions equal fp32's and those of
batches of one image, reports FLOPs per caption, the machine's measured matmul rate and the
fraction of it reached, and the share of our time spent in the 50,257-wide LM head.
The last line printed is a JSON object.

    python bench/generate.py [--images 32] [--hf-images 32] [--ref-images 8] [--xattn-images 16] [--rounds 4]
                             [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F


class _Tok:
    """Enough of a tokenizer for the captioner: ids are decoded as numbers."""

    eos_token_id = 50256
    pad_token_id = 50256

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@torch.no_grad()
def reference_beam(model, clip_vector: torch.Tensor, beam: int, tokens: int) -> list[int]:
    """ClipCap's generate_beam: no KV cache, GPT-2 re-run on the whole sequence each step."""
    gpt = model.gpt
    embed = model.prefix(clip_vector[None])  # [1, K, W]
    scores, seqs, lengths = None, None, torch.ones(beam)
    for _ in range(tokens):
        logits = gpt(inputs_embeds=embed).logits[:, -1, :].log_softmax(-1)
        if scores is None:
            scores, nxt = logits.topk(beam, -1)
            embed = embed.expand(beam, *embed.shape[1:])
            nxt, scores = nxt.permute(1, 0), scores.squeeze(0)
            seqs = nxt
        else:
            total = (scores[:, None] + logits) / 1.0
            flat = (total / lengths[:, None]).view(-1)
            best, idx = flat.topk(beam, -1)
            src, nxt = idx // logits.shape[1], (idx % logits.shape[1])[:, None]
            seqs = torch.cat([seqs[src], nxt], dim=1)
            embed, lengths = embed[src], lengths[src] + 1
            scores = best * lengths
        embed = torch.cat([embed, gpt.get_input_embeddings()(nxt.view(beam, 1))], dim=1)
    return seqs[scores.argmax()].tolist()


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured GFLOP/s of an n x n matmul in ``dtype`` on all of torch's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flops_per_caption(cfg, mapper, prefix: int, beams: int, tokens: int) -> dict:
    """2 x multiply-adds of the matmuls of one caption on our path.

    The mapper; GPT-2 over the first prefix-1 positions once per image (the cache
    that every beam then shares); generate's first forward on the last prefix
    position of each beam, with the LM head; then tokens-1 steps of one position
    per beam. (transformers alone would run the whole prefix once per beam.)
    """
    d, layers, vocab = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    body = 2 * layers * (4 * d * d + 2 * d * (cfg.n_inner or 4 * d))  # per position
    head = 2 * d * vocab
    attn = lambda ctx: 2 * 2 * layers * ctx * d  # noqa: E731  QK^T and AV over ctx positions
    hidden = d * prefix // 2
    mapping = 2 * (mapper.clip_dim * hidden + hidden * d * prefix)
    cache = sum(body + attn(i + 1) for i in range(prefix - 1))
    first = beams * (body + attn(prefix) + head)
    steps = sum(beams * (body + attn(prefix + t + 1) + head) for t in range(tokens - 1))
    total = mapping + cache + first + steps
    return {"total": total, "head": beams * head * tokens, "body": total - beams * head * tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32, help="prefixes for ours (one batch of the stage's size)")
    ap.add_argument("--hf-images", type=int, default=32, help="prefixes for transformers one at a time")
    ap.add_argument("--ref-images", type=int, default=8, help="prefixes for the no-KV-cache loop (slowest)")
    ap.add_argument("--xattn-images", type=int, default=16,
                    help="patch-token images for the cross_attention mapper, per variant and round")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the per-image methods are split into")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every method (default: torch's, one per core); 1 on a shared machine "
                         "keeps other processes' load from stalling the threads of every small op")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.text.decoding import decode_batch, prepare_for_inference
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.core.params import GenerateParams, MapperParams
    from pipeline.core.runtime import choose_precision

    torch.manual_seed(0)
    cfg = GPT2Config()
    gpt = GPT2LMHeadModel(cfg).eval()
    mapper = MapperParams(type="mlp", prefix_length=10)

    fp32 = ClipCaptioner.from_settings(mapper.model_dump(), 512, gpt, _Tok()).eval()
    stage = GenerateParams(num_beams=args.beams, min_new_tokens=args.tokens, max_new_tokens=args.tokens)
    device = torch.device("cpu")
    precision = choose_precision(stage.precision, device)
    ours = prepare_for_inference(copy.deepcopy(fp32), device, precision)
    ours_fp32 = prepare_for_inference(fp32, device, "fp32")
    vectors = F.normalize(torch.randn(args.images, 512), dim=-1)
    keys = [f"img{i}" for i in range(args.images)]
    hf_kwargs = dict(num_beams=args.beams, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                     early_stopping=True, length_penalty=1.0, do_sample=False, eos_token_id=50256,
                     pad_token_id=50256)

    def ours_run(model):
        out = []
        for lo in range(0, args.images, stage.batch_size):
            out += decode_batch(model, vectors[lo:lo + stage.batch_size], stage, keys[lo:lo + stage.batch_size])
        return [caps[0].text for caps in out]

    @torch.inference_mode()
    def hf_one(i):
        prefix = fp32.prefix(vectors[i:i + 1])
        ids = gpt.generate(inputs_embeds=prefix, attention_mask=torch.ones(1, 10, dtype=torch.long), **hf_kwargs)
        return fp32.decode(ids)[0]

    # (d) SmallCap's architecture: cross-attention to ViT-B/32's patch tokens at reduce factor 4.
    xattn_fp32 = ClipCaptioner.from_settings(MapperParams(type="cross_attention", prefix_length=1).model_dump(),
                                             768, copy.deepcopy(gpt), _Tok()).eval()
    xattn = prepare_for_inference(xattn_fp32, device, precision)
    patch_tokens = torch.randn(args.xattn_images, 50, 768)
    xkeys = [f"x{i}" for i in range(args.xattn_images)]

    def xattn_run(shared: bool) -> list[str]:
        xattn.mapper.share_kv = shared
        out = []
        for lo in range(0, args.xattn_images, stage.batch_size):
            out += decode_batch(xattn, patch_tokens[lo:lo + stage.batch_size], stage, xkeys[lo:lo + stage.batch_size])
        xattn.mapper.share_kv = True
        return [caps[0].text for caps in out]

    times = {"ours": 0.0, "hf": 0.0, "ref": 0.0, "xattn": 0.0, "xattn_copied": 0.0}
    counts = {"ours": 0, "hf": 0, "ref": 0, "xattn": 0, "xattn_copied": 0}
    xattn_same = True
    hf_captions: list[str] = []
    ours_captions: list[str] = []
    with torch.inference_mode():
        decode_batch(ours, vectors[:2], stage, keys[:2])  # warm-up
        decode_batch(xattn, patch_tokens[:2], stage, xkeys[:2])
        hf_one(0)
    hf_split = [range(r * args.hf_images // args.rounds, (r + 1) * args.hf_images // args.rounds)
                for r in range(args.rounds)]
    ref_split = [range(r * args.ref_images // args.rounds, (r + 1) * args.ref_images // args.rounds)
                 for r in range(args.rounds)]
    for r in range(args.rounds):
        t = time.perf_counter()
        ours_captions = ours_run(ours)
        times["ours"] += time.perf_counter() - t
        counts["ours"] += args.images
        t = time.perf_counter()
        hf_captions += [hf_one(i) for i in hf_split[r]]
        times["hf"] += time.perf_counter() - t
        counts["hf"] += len(hf_split[r])
        t = time.perf_counter()
        for i in ref_split[r]:
            reference_beam(fp32, vectors[i], args.beams, args.tokens)
        times["ref"] += time.perf_counter() - t
        counts["ref"] += len(ref_split[r])
        if args.xattn_images:
            captions = {}
            for shared, name in ((True, "xattn"), (False, "xattn_copied")):
                t = time.perf_counter()
                with torch.inference_mode():
                    captions[name] = xattn_run(shared)
                times[name] += time.perf_counter() - t
                counts[name] += args.xattn_images
            xattn_same = xattn_same and captions["xattn"] == captions["xattn_copied"]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {counts[k] / max(times[k], 1e-9):.3f} captions/s" for k in times), flush=True)

    t = time.perf_counter()
    with torch.inference_mode():
        fp32_captions = ours_run(ours_fp32)
    t_fp32 = time.perf_counter() - t
    same_as_hf = fp32_captions[:len(hf_captions)] == hf_captions
    same_precision_vs_fp32 = sum(a == b for a, b in zip(ours_captions, fp32_captions))
    # Our path, default precision, one image per batch: do the captions depend on the batch?
    t = time.perf_counter()
    with torch.inference_mode():
        single = [decode_batch(ours, vectors[i:i + 1], stage, keys[i:i + 1])[0][0].text for i in range(args.images)]
    t_single = time.perf_counter() - t
    same_unbatched = sum(a == b for a, b in zip(ours_captions, single))

    # Where our time goes: the fp32 LM head alone, at our batch's row count, for every step of a batch.
    rows = min(args.images, stage.batch_size) * args.beams
    head = ours.gpt.get_output_embeddings()
    hidden = torch.randn(rows, 1, cfg.n_embd).to(next(ours.gpt.parameters()).dtype)
    with torch.inference_mode():
        head(hidden)
        t = time.perf_counter()
        for _ in range(args.tokens):
            head(hidden)
        head_seconds = (time.perf_counter() - t) * args.images / min(args.images, stage.batch_size)
    ours_seconds_per_run = times["ours"] / args.rounds

    flops = flops_per_caption(cfg, fp32.mapper.config, 10, args.beams, args.tokens)
    rate_fp32, rate_bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    low = rate_bf16 if precision == "bf16" else rate_fp32
    # The best our mix could do: the body at the low-precision rate, the fp32 head at the fp32 rate.
    bound_s = flops["body"] / (low * 1e9) + flops["head"] / (rate_fp32 * 1e9)
    res = {
        "bench": "generate", "unit": "captions/s",
        "ours": round(counts["ours"] / times["ours"], 3),
        "hf_per_image": round(counts["hf"] / times["hf"], 3),
        "no_kv_cache_loop": round(counts["ref"] / times["ref"], 3),
        "precision": precision,
        "ours_fp32": round(args.images / t_fp32, 3),
        "threads": torch.get_num_threads(), "batch_size": stage.batch_size, "beams": args.beams, "new_tokens": args.tokens, "prefix_length": 10,
        "images": {"ours": counts["ours"], "hf_per_image": counts["hf"], "no_kv_cache_loop": counts["ref"]},
        "ours_fp32_same_captions_as_hf": same_as_hf,
        "ours_vs_ours_fp32_same_captions": f"{same_precision_vs_fp32}/{args.images}",
        "ours_one_image_per_batch": round(args.images / t_single, 3),
        "ours_batched_vs_one_per_batch_same_captions": f"{same_unbatched}/{args.images}",
        "gflop_per_caption": round(flops["total"] / 1e9, 2),
        "lm_head_share_of_flops": round(flops["head"] / flops["total"], 3),
        "matmul_gflops_fp32": round(rate_fp32, 1), "matmul_gflops_bf16": round(rate_bf16, 1),
        "lm_head_share_of_time": round(head_seconds / ours_seconds_per_run, 3),
    }
    if args.xattn_images:
        res["xattn_captions_per_s"] = round(counts["xattn"] / times["xattn"], 3)
        res["xattn_copied_kv_captions_per_s"] = round(counts["xattn_copied"] / times["xattn_copied"], 3)
        res["ratio_xattn_shared_cache"] = round(res["xattn_captions_per_s"] / res["xattn_copied_kv_captions_per_s"], 2)
        res["xattn_shared_cache_same_captions"] = xattn_same
        res["xattn_trainable_params"] = sum(p.numel() for p in xattn_fp32.mapper.parameters())
    res["ratio_vs_hf_per_image"] = round(res["ours"] / res["hf_per_image"], 2)
    res["ratio_vs_no_kv_cache_loop"] = round(res["ours"] / res["no_kv_cache_loop"], 2)
    res["ours_gflops"] = round(res["ours"] * flops["total"] / 1e9, 1)
    res["fraction_of_matmul_bound"] = round(res["ours"] * bound_s, 3)
    print(f"ours ({precision}, batch {stage.batch_size}): {res['ours']} captions/s; in fp32 {res['ours_fp32']}")
    print(f"transformers generate, one image at a time, fp32: {res['hf_per_image']} captions/s "
          f"(ours x{res['ratio_vs_hf_per_image']})")
    print(f"ClipCap loop without KV cache, fp32: {res['no_kv_cache_loop']} captions/s "
          f"(ours x{res['ratio_vs_no_kv_cache_loop']})")
    print(f"ours in fp32 gives transformers' captions: {same_as_hf}; ours ({precision}) equals ours in fp32 for "
          f"{res['ours_vs_ours_fp32_same_captions']} images and ours one image per batch for "
          f"{res['ours_batched_vs_one_per_batch_same_captions']}")
    print(f"{res['gflop_per_caption']} GFLOP per caption ({res['lm_head_share_of_flops']:.0%} in the LM head); "
          f"ours runs {res['ours_gflops']} GFLOP/s = {res['fraction_of_matmul_bound']:.0%} of the matmul bound "
          f"(fp32 {res['matmul_gflops_fp32']}, bf16 {res['matmul_gflops_bf16']} GFLOP/s); "
          f"the fp32 LM head takes {res['lm_head_share_of_time']:.0%} of our time")
    if args.xattn_images:
        print(f"cross_attention (50 x 768 patch tokens, reduce factor 4, {precision}): "
              f"{res['xattn_captions_per_s']} captions/s with keys/values shared by the beams, "
              f"{res['xattn_copied_kv_captions_per_s']} copied to every beam (shared x{res['ratio_xattn_shared_cache']}"
              f"; same captions: {xattn_same})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
