"""Decoding settings: every value explicit in transformers' format, and param errors that name the keys."""
from __future__ import annotations

import pytest
import torch

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


# ------------------------------------------- what the settings do to the captions
# An untrained captioner (random MLP mapper on the scene-word GPT-2, 12 tokens) repeats
# itself and spreads its probability over several tokens: without the settings below its
# captions repeat bigrams and its samples leave the top-k and the nucleus, so each test
# can fail. Every check first shows that the setting has something to change.
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def untrained(tiny_gpt_dir):
    import torch

    from pipeline.models.captioner import ClipCaptioner
    from pipeline.core.params import MapperParams
    from tests.helpers.models import load_tiny_gpt, torch_threads

    with torch_threads(1):
        gpt, tok = load_tiny_gpt(tiny_gpt_dir)
        torch.manual_seed(0)
        model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok)
        vectors = torch.randn(8, 16)
        yield model.eval(), vectors, [f"img-{i}" for i in range(len(vectors))]


def _decode(untrained, **settings) -> list[list[str]]:
    from pipeline.text.decoding import decode_batch
    from tests.helpers.models import torch_threads

    model, vectors, keys = untrained
    with torch_threads(1):
        nbest = decode_batch(model, vectors, Decoding(max_new_tokens=MAX_TOKENS, **settings), keys)
    return nbest


def _repeats(text: str, n: int) -> bool:
    # The tokenizer is word-level: a word is a token, and so is a blank line (decoded "\n\n").
    words = [w for w in text.split(" ") if w]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("mode, sizes", [({"num_beams": 1}, (2, 3)), ({"num_beams": 3}, (2, 3)),
                                         ({"num_beams": 1, "do_sample": True, "num_return_sequences": 3}, (2,))],
                         ids=["greedy", "beam", "sample"])
def test_no_repeat_ngram_size_applies_when_decoding(untrained, mode, sizes, monkeypatch):
    """The decode call itself honours no_repeat_ngram_size (not only the written config)."""
    model = untrained[0]

    def every_token(ids):  # <unk> kept in the text: the setting counts tokens, and text drops it
        rows = [row[: row.index(model.eos_token_id)] if model.eos_token_id in row else row for row in ids.tolist()]
        return [model.tokenizer.decode(row, skip_special_tokens=False).strip() for row in rows]

    monkeypatch.setattr(model, "decode", every_token)
    for n in sizes:  # the sizes at which this mode's captions repeat without the setting
        free = [c.text for caps in _decode(untrained, **mode) for c in caps]
        assert any(_repeats(t, n) for t in free), free  # without it, captions repeat n-grams
        held = [c.text for caps in _decode(untrained, no_repeat_ngram_size=n, **mode) for c in caps]
        assert not [t for t in held if _repeats(t, n)], held
        assert sum(len(t.split()) > n for t in held) >= len(held) // 2  # long enough to repeat


def _sampled_tokens(untrained, nbest) -> list[tuple[torch.Tensor, int]]:
    """(the model's next-token probabilities, the sampled token) at every step of the sampled
    captions whose tokens are known exactly: re-encoding the text gives back the caption's
    own score (its mean token log-probability). A caption holding ``<unk>``, which decoding
    drops from the text, does not, and is left out."""
    import torch

    model, vectors, _ = untrained
    out = []
    for i, caps in enumerate(nbest):
        for cap in caps:
            ids = model.tokenizer(cap.text, add_special_tokens=False)["input_ids"]
            if len(ids) < MAX_TOKENS:
                ids = ids + [model.eos_token_id]
            ids_t = torch.tensor([ids])
            with torch.no_grad():
                logp = model.token_logprobs(vectors[i:i + 1], ids_t, torch.ones_like(ids_t))[0]
                probs = model.gpt(inputs_embeds=torch.cat(
                    [model.prefix(vectors[i:i + 1]), model.gpt.get_input_embeddings()(ids_t)], dim=1)
                ).logits[0, model.prefix_length - 1:-1].float().softmax(-1)
            if abs(float(logp.mean()) - cap.score) < 1e-4:
                out += list(zip(probs, ids))
    return out


def _ahead(probs, token):
    """The probability of the tokens more likely than ``token``, and how many they are."""
    above = probs[probs > probs[token]]
    return float(above.sum()), len(above)


SAMPLE = {"num_beams": 1, "do_sample": True, "num_return_sequences": 4}


def test_top_k_applies_when_sampling(untrained):
    greedy = _decode(untrained, num_beams=1)
    assert _decode(untrained, do_sample=True, num_beams=1) != greedy  # plain samples differ
    assert _decode(untrained, do_sample=True, num_beams=1, top_k=1) == greedy
    for k in (2, 3):
        free = _sampled_tokens(untrained, _decode(untrained, **SAMPLE))
        assert any(_ahead(p, t)[1] >= k for p, t in free)  # without top_k, samples leave the top k
        kept = _sampled_tokens(untrained, _decode(untrained, top_k=k, **SAMPLE))
        assert len(kept) >= 50 and any(_ahead(p, t)[1] > 0 for p, t in kept)  # not greedy either
        assert all(_ahead(p, t)[1] < k for p, t in kept)


def test_top_p_applies_when_sampling(untrained):
    greedy = _decode(untrained, num_beams=1)
    assert _decode(untrained, do_sample=True, num_beams=1) != greedy
    assert _decode(untrained, do_sample=True, num_beams=1, top_p=1e-6) == greedy
    for p_top in (0.5, 0.7):
        free = _sampled_tokens(untrained, _decode(untrained, **SAMPLE))
        assert any(_ahead(p, t)[0] >= p_top for p, t in free)  # without top_p, samples leave the nucleus
        kept = _sampled_tokens(untrained, _decode(untrained, top_p=p_top, **SAMPLE))
        assert len(kept) >= 50 and any(_ahead(p, t)[1] > 0 for p, t in kept)
        # In the nucleus: the tokens more likely than the sampled one hold less than top_p.
        assert all(_ahead(p, t)[0] < p_top for p, t in kept)


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
