"""Turning prefixes into captions with transformers' ``generate``: precision, seeds, scores.

The one decode path: generate, caption and SCST's sampling and greedy captions
all go through ``generate_ids`` (``decode_batch`` turns its ids into captions).
The settings themselves (``Decoding`` as a ``GenerationConfig``,
``generation_config.json``) are ``pipeline/models/decoding_config.py``'s.
* ``prepare_for_inference``: the model in the chosen precision. bf16/fp16 means
  bf16/fp16 *weights* for the mapper and GPT-2 (not fp32 weights re-cast under
  autocast at every step), with the LM head kept in fp32: GPT-2's logits lie far
  from zero (about -100 to -50 for the real GPT-2), where bf16 steps are 0.25 to
  0.5 apart, so bf16 logits would tie and reorder beams. The fp32 head makes the
  log-softmax exact to fp32 rounding.
* ``decode_batch``: one ``generate`` call for a batch of CLIP vectors; the
  captions of each image, best first, with their sequence scores.

Sampling with ``num_beams: 1`` draws each token by the Gumbel-max trick from
noise of a generator seeded per image (``seed``, the image's key, the index of
the caption), inside a logits processor, and lets generate take the argmax. The
draw has exactly the distribution of transformers' multinomial sampling, but an
image's captions depend only on the seed and the image: not on its batch, the
batch size or the number of processes (transformers' own sampler draws from
torch's global generator, shared by every row of the batch). Beam sampling
(``num_beams > 1`` with ``do_sample``) is transformers' own, seeded once per batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ParamsError
from pipeline.models.decoding_config import generation_config
from pipeline.core.params import Decoding
from pipeline.core.runtime import dtype_of
from pipeline.models.prompt import pad_left, positions

if TYPE_CHECKING:
    from pipeline.models.captioner import ClipCaptioner

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Caption:
    text: str
    score: Optional[float] = None  # summed token log-probability / length ** length_penalty


# ----------------------------------------------------------------- precision
class Fp32Head(nn.Module):
    """GPT-2's LM head in fp32 over a low-precision body: exact logits for the log-softmax."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float32).clone(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(torch.float32), self.weight)


def prepare_for_inference(model: "ClipCaptioner", device: torch.device, precision: str) -> "ClipCaptioner":
    """Move ``model`` to ``device`` with weights in ``precision`` (resolved: fp32, bf16, fp16), for decoding only.

    Below fp32, the mapper and GPT-2 hold weights in that dtype, GPT-2's tanh-GELU
    runs as one fused kernel (which computes in fp32 inside; the composite
    ``gelu_new`` would round after each of its eight steps), and the LM head stays
    fp32. A model prepared this way is not meant to be trained or saved.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    model = model.to(device).eval()
    if precision == "fp32":
        return model
    head = model.gpt.get_output_embeddings()
    fp32_head = Fp32Head(head.weight).to(device)
    dtype = dtype_of(precision)
    model.mapper.to(dtype)
    model.gpt.to(dtype)
    model.gpt.set_output_embeddings(fp32_head)
    for module in list(model.gpt.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
    return model


# ------------------------------------------------------------------ sampling
def row_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for caption ``index`` of image ``key``: a pure function of the three."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededSampler:
    """A logits processor that samples each row's next token from its own seeded generator.

    It applies transformers' own temperature, top-k and top-p warpers (in
    transformers' order), draws by the Gumbel-max trick, records the token's
    log-probability under the model (before the warpers) for the caption's score,
    and returns scores whose argmax is the drawn token.
    """

    def __init__(self, seeds: Sequence[int], d: Decoding, device: torch.device) -> None:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = []
        if d.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(d.temperature))
        if d.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=d.top_k, min_tokens_to_keep=1))
        if d.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=d.top_p, min_tokens_to_keep=1))
        self.warpers = LogitsProcessorList(warpers)
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.token_logprobs: list[torch.Tensor] = []  # one [rows] tensor per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        logprobs = scores.log_softmax(-1)
        warped = self.warpers(input_ids, scores)
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
        tokens = (warped + gumbel).argmax(-1)
        self.token_logprobs.append(logprobs.gather(1, tokens[:, None]).squeeze(1))
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens[:, None], 0.0)


# ------------------------------------------------------------------ decoding
def check_room(model: "ClipCaptioner", d: Decoding, name=lambda key: f"generate.{key}") -> int:
    """max_new_tokens capped by GPT-2's positions after the prefix; min_new_tokens must fit.

    ``name`` turns a field into what the user wrote (a params key or an option).
    """
    room = model.caption_room
    # A retrieval captioner's longest prompt takes positions too.
    taken = f"the prefix takes {model.prefix_length}" + (
        f" and the longest prompt {model.prompt_room}" if model.prompt_room else "")
    if d.min_new_tokens > room:
        raise ParamsError(f"{name('min_new_tokens')}: {d.min_new_tokens} does not fit: GPT-2 has "
                          f"{model.max_positions} positions and {taken}, leaving {room}")
    if d.max_new_tokens > room:
        log.warning("%s %d cut to %d: GPT-2 has %d positions and %s",
                    name("max_new_tokens"), d.max_new_tokens, room, model.max_positions, taken)
    return min(d.max_new_tokens, room)


@torch.inference_mode()
def generate_ids(model: "ClipCaptioner", vectors: torch.Tensor, d: Decoding, keys: Sequence[str],
                 max_new_tokens: Optional[int] = None, prompts: Optional[Sequence[Sequence[int]]] = None
                 ) -> tuple[Any, Optional[SeededSampler]]:
    """One ``generate`` call for ``d``: the new token ids (rows image-major, each image's
    ``d.num_return_sequences`` adjacent; with several scored beams, generate's output with
    ``sequences`` and ``sequences_scores``), and the sampler when ``d`` samples without beams.

    ``keys`` name the images (seeds of their samples). ``max_new_tokens`` (default
    ``d.max_new_tokens``) is capped by GPT-2's positions after the prefix. The one
    decode path: generate, caption and SCST's sampling and greedy captions come here.
    ``prompts``: a retrieval captioner's prompt ids of each image (``model.prompt_ids``), of
    any lengths: GPT-2 reads prefix and prompt left-padded, with their mask, and generate
    makes the position ids from the mask, so a caption does not depend on its batch.
    """
    n = d.num_return_sequences
    limit = min(d.max_new_tokens if max_new_tokens is None else max_new_tokens, model.caption_room)
    if prompts is None:
        prefix = model.prefix(vectors.to(model.device))
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        prompt = None
    else:  # a retrieval captioner: prefix and prompt, left-padded
        prompt = pad_left(prompts, model.pad_token_id)
        prefix, mask = model.context(vectors.to(model.device), prompt)
    config = generation_config(d, model.eos_token_id, model.pad_token_id, max_new_tokens=limit)
    processors = []
    sampler = None
    ours = 1  # rows we make per image; generate itself makes num_beams rows of each
    if d.do_sample and d.num_beams == 1:
        # Rows image-major: image i's captions are rows i*n .. i*n+n-1, each with its own seed;
        # generate itself decodes greedily over the sampler's choice.
        ours = n
        sampler = SeededSampler([row_seed(d.seed, k, j) for k in keys for j in range(n)], d, prefix.device)
        processors.append(sampler)
        plain = d.model_copy(update={"do_sample": False, "num_return_sequences": 1})
        config = generation_config(plain, model.eos_token_id, model.pad_token_id, max_new_tokens=limit)
    elif d.do_sample:
        # Beam sampling: transformers' own draw from the global generator, seeded per batch.
        torch.manual_seed(row_seed(d.seed, keys[0] if keys else "", len(keys)))
    if d.num_beams > 1 and n > 1:
        config.return_dict_in_generate = True
        config.output_scores = True
    # A cross-attention mapper's keys and values: computed once per image, shared by its rows.
    with model.attending(vectors):
        cache = prefix_cache(model, prefix, ours * d.num_beams, None if prompt is None else mask)
        if ours > 1:
            prefix = prefix.repeat_interleave(ours, dim=0)
            mask = mask.repeat_interleave(ours, dim=0)
        with warnings.catch_warnings(), _no_padding_warning():
            # With inputs_embeds the penalties see only the caption's tokens: what we want, not a problem.
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with")
            out = model.gpt.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config,
                                     logits_processor=processors or None, cache=cache)
    return out, sampler


class _PaddingWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask" not in record.getMessage()


@contextlib.contextmanager
def _no_padding_warning():
    """Silence GPT-2's "pass an attention_mask" warning for one generate call.

    The mask is passed, but transformers' generate drops a mask of all ones
    (generation/utils.py: "we can drop the mask altogether if it's all 1s"); GPT-2 then
    sees a finished row's pad (= EOS) token and warns, though those tokens are past
    the caption's end and never read.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _PaddingWarningFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def decode_batch(model: "ClipCaptioner", vectors: torch.Tensor, d: Decoding, keys: Sequence[str],
                 max_new_tokens: Optional[int] = None, prompts: Optional[Sequence[Sequence[int]]] = None
                 ) -> list[list[Caption]]:
    """Captions of each vector (``d.num_return_sequences`` each, best first) with their scores.

    ``keys`` name the images (seeds of their samples). Scores are given when an
    image gets several captions: transformers' beam score, or for samples the
    summed log-probability of their tokens (EOS included) divided by their length.
    ``prompts``: a retrieval captioner's prompt ids of each image (see ``generate_ids``).
    """
    n = d.num_return_sequences
    out, sampler = generate_ids(model, vectors, d, keys, max_new_tokens, prompts)
    scored_beams = d.num_beams > 1 and n > 1
    ids = out.sequences if scored_beams else out
    texts = model.decode(ids)
    if scored_beams:
        scores = out.sequences_scores.float().tolist()
    elif sampler is not None and n > 1:
        scores = _sample_scores(sampler, ids, model.eos_token_id)
    else:
        scores = [None] * len(texts)
    captions = [Caption(t, None if s is None else round(float(s), 6)) for t, s in zip(texts, scores)]
    per_image = [captions[i * n:(i + 1) * n] for i in range(len(keys))]
    if sampler is not None and n > 1:
        # Best first, as beam search returns them; ties keep the draw order.
        per_image = [sorted(caps, key=lambda c: -c.score) for caps in per_image]
    return per_image


def prefix_cache(model: "ClipCaptioner", prefix: torch.Tensor, rows_per_image: int,
                 mask: Optional[torch.Tensor] = None):
    """GPT-2's KV cache of all but the last prefix position, computed once per image and
    repeated for each of its ``rows_per_image`` rows (beams, samples); None when each image
    has one row.

    generate copies the prefix to every beam before its first forward pass; with this
    cache it runs only the last prefix position per beam, which saves
    (rows_per_image - 1) x (prefix_length - 1) positions of GPT-2 per image. ``mask``: a
    left-padded context's (prefix and prompt), read with the positions generate gives it.
    """
    if rows_per_image <= 1 or prefix.shape[1] < 2:
        return None
    if mask is None:
        out = model.gpt.transformer(inputs_embeds=prefix[:, :-1], use_cache=True)
    else:
        out = model.gpt.transformer(inputs_embeds=prefix[:, :-1], attention_mask=mask[:, :-1],
                                    position_ids=positions(mask[:, :-1]), use_cache=True)
    cache = out.cache
    cache.batch_repeat_interleave(rows_per_image)
    return cache


def _sample_scores(sampler: SeededSampler, ids: torch.Tensor, eos: int) -> list[float]:
    """Mean log-probability of each sampled caption's tokens, up to and including its first EOS."""
    if not sampler.token_logprobs:
        return [0.0] * ids.shape[0]
    logprobs = torch.stack(sampler.token_logprobs, dim=1)[:, : ids.shape[1]]
    scores = []
    for row, lp in zip(ids.tolist(), logprobs):
        length = row.index(eos) + 1 if eos in row else len(row)
        scores.append(float(lp[:length].sum()) / max(length, 1))
    return scores
