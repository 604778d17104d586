"""Benchmark of caption generation against the reference's way of decoding.

GPT-2 small built from its default config and an MLP mapper over 512-d vectors
(random weights: the same compute as trained ones). In one run it measures, with
beam 5 and a fixed number of new tokens (min = max, so every method does the same
number of steps):
  (a) ours: ClipCaptioner.caption, batches of --batch-size images (KV cache);
  (b) one image at a time through the same generate call (KV cache);
  (c) the reference's decoding: ClipCap's generate_beam, one image at a time,
      re-running GPT-2 on the whole sequence at every step (no KV cache).
It checks that (a) and (b) give identical captions and prints the speed-ups.
The last line printed is a JSON object.

    python bench/generate.py [--images 16] [--batch-size 16] [--tokens 20] [--ref-images 4]
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--ref-images", type=int, default=4)
    args = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.models.captioner import ClipCaptioner
    from pipeline.params import MapperParams

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config()).eval()
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=10).model_dump(), 512, gpt,
                                        _Tok()).eval()
    vectors = F.normalize(torch.randn(args.images, 512), dim=-1)
    kw = dict(num_beams=args.beams, max_new_tokens=args.tokens, min_new_tokens=args.tokens, early_stopping=True)

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    with torch.inference_mode():
        model.caption(vectors[:2], **kw)  # warm-up
        ours, t_ours = timed(lambda: [c for i in range(0, args.images, args.batch_size)
                                      for c in model.caption(vectors[i:i + args.batch_size], **kw)])
        single, t_single = timed(lambda: [model.caption(vectors[i:i + 1], **kw)[0] for i in range(args.images)])
    _, t_ref = timed(lambda: [reference_beam(model, vectors[i], args.beams, args.tokens)
                              for i in range(args.ref_images)])
    res = {
        "images": args.images, "beams": args.beams, "new_tokens": args.tokens, "batch_size": args.batch_size,
        "ours_captions_per_s": round(args.images / t_ours, 3),
        "one_at_a_time_captions_per_s": round(args.images / t_single, 3),
        "reference_no_cache_captions_per_s": round(args.ref_images / t_ref, 3),
        "identical_batched_vs_single": ours == single,
    }
    res["speedup_vs_one_at_a_time"] = round(res["ours_captions_per_s"] / res["one_at_a_time_captions_per_s"], 2)
    res["speedup_vs_reference"] = round(res["ours_captions_per_s"] / res["reference_no_cache_captions_per_s"], 2)
    print(f"ours (batch {args.batch_size}, KV cache): {res['ours_captions_per_s']} captions/s")
    print(f"one at a time (KV cache):       {res['one_at_a_time_captions_per_s']} captions/s")
    print(f"reference (no cache, one):      {res['reference_no_cache_captions_per_s']} captions/s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
