"""Decoding settings as transformers' ``GenerationConfig`` and as ``generation_config.json``.

* ``generation_config``: the ``Decoding`` params as transformers' own
  ``GenerationConfig``, every value explicit (nothing left to a library default),
  sampling-only and beam-only fields present exactly where they apply (the file
  passes transformers' strict validation).
* ``save_generation_config`` / ``load_decoding``: the file of a model folder (its
  decoding defaults) and beside the generate stage's results.

Only settings and files: no model. ``pipeline/models/captioner.py`` (which saves
and loads the file) and ``pipeline/text/decoding.py`` (which decodes) both use it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.core.errors import ParamsError
from pipeline.core.params import Decoding, validated
from pipeline.core.vocabulary import NOT_APPLICABLE
from pipeline.models.pretrained import ModelError

if TYPE_CHECKING:
    from transformers import GenerationConfig

GENERATION_CONFIG = "generation_config.json"
DECODING_FIELDS = tuple(Decoding.model_fields)


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
    for key, (off, _) in NOT_APPLICABLE.items():  # left out of the file where they do not apply
        known.setdefault(key, off)
    return validated(Decoding, known)


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


def model_defaults(room: int) -> Decoding:
    """The pipeline's documented decoding defaults (the schema's, from code), with
    ``max_new_tokens`` cut to the ``room`` GPT-2's positions leave after the prefix."""
    d = Decoding()
    return d.model_copy(update={"max_new_tokens": max(1, min(d.max_new_tokens, room))})


def load_decoding(model_dir: Path) -> Optional[Decoding]:
    """The decoding defaults saved in a model folder, or None when it has none."""
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return None
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
