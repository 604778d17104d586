"""Decoding settings: every value explicit in transformers' format, and param errors that name the keys."""
from __future__ import annotations

import pytest

from pipeline.text.decoding import row_seed
from pipeline.models.decoding_config import decoding_from_config, generation_config
from pipeline.core.params import Decoding, ParamsError, parse_params

VALID = [
    {},
    {"num_beams": 1},
    {"num_beams": 3, "num_return_sequences": 3, "length_penalty": 0.5, "no_repeat_ngram_size": 3},
    {"num_beams": 1, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "num_return_sequences": 5},
    {"num_beams": 4, "do_sample": True, "num_return_sequences": 2, "repetition_penalty": 1.3},
    {"min_new_tokens": 5, "max_new_tokens": 5},
]


@pytest.mark.parametrize("values", VALID)
def test_generation_config_is_explicit_valid_and_round_trips(values):
    d = Decoding(**values)
    config = generation_config(d, eos_token_id=7, pad_token_id=7)
    config.validate(strict=True)  # what transformers checks before saving
    assert decoding_from_config(config) == d
    assert config.do_sample == d.do_sample and config.num_beams == d.num_beams
    if d.do_sample:  # no sampling knob is left to transformers' defaults (top_k=50 among them)
        assert (config.top_k, config.top_p, config.temperature) == (d.top_k, d.top_p, d.temperature)


@pytest.mark.parametrize("values, keys", [
    ({"num_beams": 2, "num_return_sequences": 3}, ["generate.num_return_sequences", "generate.num_beams"]),
    ({"num_beams": 1, "num_return_sequences": 2}, ["generate.num_return_sequences", "generate.num_beams",
                                                   "do_sample"]),
    ({"temperature": 0.7}, ["generate.temperature", "generate.do_sample"]),
    ({"top_k": 50}, ["generate.top_k", "generate.do_sample"]),
    ({"top_p": 0.9}, ["generate.top_p", "generate.do_sample"]),
    ({"num_beams": 1, "length_penalty": 0.5}, ["generate.length_penalty", "generate.num_beams"]),
    ({"min_new_tokens": 9, "max_new_tokens": 8}, ["generate.min_new_tokens", "generate.max_new_tokens"]),
    ({"top_p": 1.5, "do_sample": True}, ["generate.top_p"]),
    ({"temperature": 0, "do_sample": True}, ["generate.temperature"]),
    ({"repetition_penalty": 0}, ["generate.repetition_penalty"]),
])
def test_impossible_settings_are_param_errors_naming_the_keys(values, keys):
    with pytest.raises(ParamsError) as err:
        parse_params({"generate": values})
    for key in keys:
        assert key in str(err.value)


def test_row_seeds_are_a_pure_function_of_seed_image_and_index():
    assert row_seed(0, "a", 0) == row_seed(0, "a", 0)
    assert len({row_seed(s, k, j) for s in (0, 1) for k in ("a", "b") for j in (0, 1)}) == 8


def test_bf16_weights_keep_an_fp32_lm_head(tiny_gpt_dir):
    """Below fp32 the body's weights are bf16, but the logits are not rounded to bf16
    (GPT-2's logits sit far from zero, where bf16 steps would tie and reorder beams)."""
    import torch

    from pipeline.models.captioner import ClipCaptioner
    from pipeline.text.decoding import prepare_for_inference
    from pipeline.core.params import MapperParams
    from tests.helpers.models import load_tiny_gpt, torch_threads

    with torch_threads(1):
        gpt, tok = load_tiny_gpt(tiny_gpt_dir)
        torch.manual_seed(0)  # the mapper's weights and the vectors: the same in every run
        model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok)
        model = prepare_for_inference(model.eval(), torch.device("cpu"), "bf16")
        assert next(model.gpt.transformer.parameters()).dtype == torch.bfloat16
        assert next(model.mapper.parameters()).dtype == torch.bfloat16
        with torch.inference_mode():
            prefix = model.prefix(torch.randn(3, 16))
            logits = model.gpt(inputs_embeds=prefix).logits
        assert logits.dtype == torch.float32
        # Rounded to bf16 and back, almost every logit would change: they were not bf16.
        assert (logits != logits.bfloat16().float()).float().mean() > 0.9


def test_no_import_cycle_between_pipeline_modules():
    """Module by module (packages are checked in test_dvc_deps): the captioner saves and loads
    its decoding defaults through decoding_config, never through the decoding module that uses it."""
    from pipeline.core.fingerprint import ROOT, imports_of, module_file

    def name(path):
        return ".".join(path.relative_to(ROOT).with_suffix("").parts)

    graph = {}
    for path in (ROOT / "pipeline").rglob("*.py"):
        found = (module_file(m) for m in imports_of(path))
        graph[name(path)] = {name(f) for f in found if f is not None and f.suffix == ".py"
                             and f.name != "__init__.py" and f != path}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail + [start]
                if nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
        return []

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, "; ".join(" -> ".join(c) for c in cycles)
