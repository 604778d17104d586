"""Turning prefixes into captions with transformers' ``generate``: settings, precision, seeds, scores.

* ``generation_config``: the ``Decoding`` params as transformers' own
  ``GenerationConfig``, every value explicit (nothing left to a library default),
  sampling-only and beam-only fields present exactly where they apply (the file
  passes transformers' strict validation). It is what ``generation_config.json``
  holds in a model folder and beside the generate stage's results.
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

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ParamsError
from pipeline.core.params import Decoding
from pipeline.core.runtime import dtype_of

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from pipeline.models.captioner import ClipCaptioner

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
DECODING_FIELDS = tuple(Decoding.model_fields)
# Values a saved generation config may leave out, because they do not apply to its mode.
_NOT_APPLICABLE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "length_penalty": 1.0}


@dataclass(frozen=True)
class Caption:
    text: str
    score: Optional[float] = None  # summed token log-probability / length ** length_penalty


# ------------------------------------------------------------- configuration
def generation_config(d: Decoding, eos_token_id: int, pad_token_id: int,
                      max_new_tokens: Optional[int] = None) -> "GenerationConfig":
    """transformers' GenerationConfig for ``d``: every value that applies to its mode, set explicitly."""
    from transformers import GenerationConfig

    kwargs = dict(
        num_beams=d.num_beams, num_return_sequences=d.num_return_sequences, do_sample=d.do_sample,
        max_new_tokens=d.max_new_tokens if max_new_tokens is None else max_new_tokens,
        min_new_tokens=d.min_new_tokens, no_repeat_ngram_size=d.no_repeat_ngram_size,
        repetition_penalty=d.repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        use_cache=True,
    )
    if d.num_beams > 1:
        # Stop a beam search when num_beams captions are finished, as ClipCap's own search does.
        kwargs.update(length_penalty=d.length_penalty, early_stopping=True)
    if d.do_sample:
        kwargs.update(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
    config = GenerationConfig(**kwargs)
    config.seed = d.seed  # not a transformers field; kept in the file so that it names the whole setting
    return config


def decoding_from_config(config: "GenerationConfig | dict") -> Decoding:
    """The ``Decoding`` a generation config describes (fields it leaves out take their 'off' value)."""
    values = config if isinstance(config, dict) else config.to_dict()
    known = {k: values[k] for k in DECODING_FIELDS if values.get(k) is not None}
    for key, off in _NOT_APPLICABLE.items():
        known.setdefault(key, off)
    return validated_decoding(known, name=lambda key: key)


def validated_decoding(values: dict, name) -> Decoding:
    """``Decoding(**values)``; a bad value or combination is a ParamsError naming ``name(key)``."""
    from pydantic import ValidationError

    try:
        return Decoding(**values)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            msg = e["msg"].removeprefix("Value error, ")
            key = str(e["loc"][0]) if e["loc"] else msg.split(":", 1)[0]
            if not e["loc"] and ":" in msg.split(" ")[0]:
                msg = msg.split(":", 1)[1].strip()
            for field in sorted(DECODING_FIELDS, key=len, reverse=True):
                msg = _replace_word(msg, field, name(field))
            if e["loc"] and e.get("input") is not None and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
            lines.append(f"{name(key)}: {msg}")
        raise ParamsError("; ".join(lines)) from None


def _replace_word(text: str, word: str, new: str) -> str:
    import re

    return re.sub(rf"(?<![\w.-]){re.escape(word)}(?![\w])", new, text)


def save_generation_config(d: Decoding, out_dir: Path, eos_token_id: int, pad_token_id: int) -> Path:
    """Write ``generation_config.json`` (transformers' format) into ``out_dir``.

    A trained model folder gets ``model_defaults``: the schema defaults of the
    ``generate`` params taken from code, not params.yaml (so that a trained model does
    not depend on params.yaml's generate section, and tuning it never retrains).
    """
    config = generation_config(d, eos_token_id, pad_token_id)
    config.validate(strict=True)  # the file must load in transformers without complaint
    config.save_pretrained(out_dir)
    return Path(out_dir) / GENERATION_CONFIG


def model_defaults(model: "ClipCaptioner") -> Decoding:
    """The pipeline's documented decoding defaults (the schema's, from code), with
    ``max_new_tokens`` cut to what GPT-2's positions leave after the prefix."""
    d = Decoding()
    return d.model_copy(update={"max_new_tokens": max(1, min(d.max_new_tokens, room_for_caption(model)))})


def default_generation_config(model: "ClipCaptioner", model_dir: Optional[Path] = None) -> "GenerationConfig":
    """The model folder's decoding defaults as a GenerationConfig (``model_defaults`` without a file)."""
    saved = load_decoding(model_dir) if model_dir is not None else None
    return generation_config(saved or model_defaults(model), model.eos_token_id, model.pad_token_id)


def load_decoding(model_dir: Path) -> Optional[Decoding]:
    """The decoding defaults saved in a model folder, or None when it has none."""
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return None
    from pipeline.models.pretrained import ModelError

    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ModelError(f"{path}: not a JSON object")
    try:
        return decoding_from_config(values)
    except ParamsError as err:
        raise ModelError(f"{path}: {err}") from None


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
def room_for_caption(model: "ClipCaptioner") -> int:
    return model.max_positions - model.prefix_length


def check_room(model: "ClipCaptioner", d: Decoding, name=lambda key: f"generate.{key}") -> int:
    """max_new_tokens capped by GPT-2's positions after the prefix; min_new_tokens must fit.

    ``name`` turns a field into what the user wrote (a params key or an option).
    """
    room = room_for_caption(model)
    if d.min_new_tokens > room:
        raise ParamsError(f"{name('min_new_tokens')}: {d.min_new_tokens} does not fit: GPT-2 has "
                          f"{model.max_positions} positions and the prefix takes {model.prefix_length}, leaving {room}")
    if d.max_new_tokens > room:
        log.warning("%s %d cut to %d: GPT-2 has %d positions and the prefix takes %d",
                    name("max_new_tokens"), d.max_new_tokens, room, model.max_positions, model.prefix_length)
    return min(d.max_new_tokens, room)


@torch.inference_mode()
def decode_batch(model: "ClipCaptioner", vectors: torch.Tensor, d: Decoding, keys: Sequence[str],
                 max_new_tokens: Optional[int] = None) -> list[list[Caption]]:
    """Captions of each vector (``d.num_return_sequences`` each, best first) with their scores.

    ``keys`` name the images (seeds of their samples). Scores are given when an
    image gets several captions: transformers' beam score, or for samples the
    summed log-probability of their tokens (EOS included) divided by their length.
    """
    n = d.num_return_sequences
    limit = max_new_tokens if max_new_tokens is not None else min(d.max_new_tokens, room_for_caption(model))
    prefix = model.prefix(vectors.to(model.device))
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
    scored_beams = d.num_beams > 1 and n > 1
    if scored_beams:
        config.return_dict_in_generate = True
        config.output_scores = True
    cache = prefix_cache(model, prefix, ours * d.num_beams)
    if ours > 1:
        prefix = prefix.repeat_interleave(ours, dim=0)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    with warnings.catch_warnings():
        # With inputs_embeds the penalties see only the caption's tokens: what we want, not a problem.
        warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with")
        out = model.gpt.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config,
                                 logits_processor=processors or None, cache=cache)
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


def prefix_cache(model: "ClipCaptioner", prefix: torch.Tensor, rows_per_image: int):
    """GPT-2's KV cache of all but the last prefix position, computed once per image and
    repeated for each of its ``rows_per_image`` rows (beams, samples); None when each image
    has one row.

    generate copies the prefix to every beam before its first forward pass; with this
    cache it runs only the last prefix position per beam, which saves
    (rows_per_image - 1) x (prefix_length - 1) positions of GPT-2 per image.
    """
    if rows_per_image <= 1 or prefix.shape[1] < 2:
        return None
    out = model.gpt.transformer(inputs_embeds=prefix[:, :-1], use_cache=True)
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
