"""The cross_attention mapper (SmallCap): size, shared keys/values, batch invariance, patch
tokens from embed to training (streamed) to generation, and the model folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.core.params import Decoding, GenerateParams, MapperParams, TrainParams, parse_params
from pipeline.core.runtime import Rank
from pipeline.formats.features import FeatureShardError, load_features
from pipeline.generate.run import caption_vectors, run as generate
from pipeline.models.captioner import ClipCaptioner
from pipeline.models.mapper import (CrossAttentionConfig, CrossAttentionMapper, MapperConfigError, count_parameters,
                                    cross_attention_parameters)
from pipeline.text.decoding import decode_batch
from pipeline.train.data import ShardVectors, collate, epoch_batches, load_training_data
from pipeline.train.run import train
from tests.helpers.features import scene_table, with_patch_tokens, write_features
from tests.helpers.models import load_tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAPPER = MapperParams(type="cross_attention", prefix_length=1, reduce_factor=2)
GEN = GenerateParams(split="test", batch_size=5, num_beams=3, max_new_tokens=8, precision="fp32")


def texts(nbest):
    return [[c.text for c in caps] for caps in nbest]


# ------------------------------------------------------------------ size
@pytest.mark.parametrize("factor, millions", [(1, 28.4), (4, 7.1), (16, 1.8)])
def test_parameter_count_matches_the_formula_and_smallcaps_sizes(factor, millions):
    """GPT-2 small and ViT-B/32 (both 768 wide, 12 blocks): SmallCap's 28M / 7M / 1.75M."""
    config = CrossAttentionConfig(clip_dim=768, width=768, prefix_length=1, reduce_factor=factor,
                                  gpt_layers=12, gpt_heads=12)
    mapper = CrossAttentionMapper(config)
    d, i = 768, 768 // factor
    per_block = 2 * d + (d * i + i) + (d * 2 * i + 2 * i) + (i * d + d)
    assert count_parameters(mapper) == 12 * per_block + d == cross_attention_parameters(768, 768, 12, factor, 1)
    assert count_parameters(mapper) / 1e6 == pytest.approx(millions, abs=0.05)


def test_only_the_cross_attention_trains(tiny_gpt_dir):
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    model = ClipCaptioner.from_settings(MAPPER.model_dump(), 24, gpt, tok, features={"dim": 24})
    c = gpt.config
    assert count_parameters(model, trainable_only=True) == \
        cross_attention_parameters(c.n_embd, 24, c.n_layer, 2, 1) == count_parameters(model.mapper)
    assert not any(p.requires_grad for p in model.gpt.parameters())
    with pytest.raises(Exception, match="keeps GPT-2 frozen"):
        ClipCaptioner.from_settings(MAPPER.model_dump(), 24, gpt, tok, finetune_gpt=True)


def test_a_reduce_factor_gpts_heads_cannot_split_names_the_key(tiny_gpt_dir):
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)  # n_embd 32, 2 heads: 32/32 = 1 is not a multiple of 2
    with pytest.raises(MapperConfigError, match="mapper.reduce_factor"):
        ClipCaptioner.from_settings({**MAPPER.model_dump(), "reduce_factor": 32}, 24, gpt, tok)


def test_params_refuse_what_cross_attention_cannot_do():
    with pytest.raises(Exception, match="train.finetune_gpt_layers"):
        parse_params({"mapper": {"type": "cross_attention"}, "train": {"finetune_gpt_layers": [0]}})
    with pytest.raises(Exception, match="clip.patch_tokens"):
        parse_params({"mapper": {"type": "cross_attention"}, "clip": {"patch_tokens": "false"}})
    with pytest.raises(Exception, match="mapper.reduce_factor"):
        parse_params({"mapper": {"type": "cross_attention", "reduce_factor": 3}})  # demo GPT-2: n_embd 128


# --------------------------------------------------------------- shared keys/values
@pytest.fixture(scope="module")
def random_model(tiny_gpt_dir):
    """Random cross-attention weights large enough that the patch tokens change the captions."""
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MAPPER.model_dump(), 24, gpt, tok, features={"dim": 24})
    for p in model.mapper.parameters():
        p.data.normal_(0, 0.5)
    return model.eval()


def test_shared_keys_values_equal_keys_values_copied_to_every_beam(random_model):
    model = random_model
    tokens = torch.randn(3, 5, 24)
    beams = 4
    prefix = model.prefix(tokens).repeat_interleave(beams, 0)
    ids = torch.randint(0, len(model.tokenizer), (3 * beams, 6))
    embeds = torch.cat([prefix, model.gpt.get_input_embeddings()(ids)], dim=1)
    logits = {}
    with torch.no_grad():
        for share in (True, False):
            model.mapper.share_kv = share
            with model.attending(tokens):
                logits[share] = model.gpt(inputs_embeds=embeds).logits
    model.mapper.share_kv = True
    assert torch.allclose(logits[True], logits[False], atol=1e-5)
    # The rows of one image agree with each other on its prefix and differ from other images'.
    assert torch.allclose(logits[True][0, 0], logits[True][beams - 1, 0], atol=1e-6)
    assert not torch.allclose(logits[True][0, 0], logits[True][beams, 0], atol=1e-3)

    d = Decoding(num_beams=beams, num_return_sequences=2, max_new_tokens=6)
    shared = decode_batch(model, tokens, d, ["a", "b", "c"])
    model.mapper.share_kv = False
    try:
        copied = decode_batch(model, tokens, d, ["a", "b", "c"])
    finally:
        model.mapper.share_kv = True
    assert texts(shared) == texts(copied)
    assert [c.score for caps in shared for c in caps] == pytest.approx([c.score for caps in copied for c in caps],
                                                                      abs=1e-5)


def test_gpt2_is_unchanged_outside_the_attending_block(random_model):
    model = random_model
    embeds = torch.randn(2, 3, model.gpt.config.n_embd)
    with torch.no_grad():
        before = model.gpt(inputs_embeds=embeds).logits
        with model.attending(torch.randn(2, 5, 24)):
            inside = model.gpt(inputs_embeds=embeds).logits
        after = model.gpt(inputs_embeds=embeds).logits
    assert torch.equal(before, after) and not torch.allclose(before, inside)


# ------------------------------------------------------- train -> generate, end to end
@pytest.fixture(scope="module")
def language_gpt(tmp_path_factory, tiny_gpt_dir, scene_features):
    """A GPT-2 that knows the captions' language, as SmallCap's pretrained one does: the tiny
    random GPT-2 frozen cannot even make confident predictions (its logits stay near uniform)."""
    root = tmp_path_factory.mktemp("lm")
    params = TrainParams(epochs=30, batch_size=8, lr=3e-3, warmup_steps=5, precision="fp32", finetune_gpt=True)
    train(scene_features(n_per_class=6), tiny_gpt_dir, root / "model", root / "loss.csv", root / "train.json",
          MapperParams(type="mlp", prefix_length=2), params, progress=False)
    return root / "model" / "gpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, language_gpt):
    root = tmp_path_factory.mktemp("xattn")
    table = with_patch_tokens(scene_table(n_per_class=6))
    feats = write_features(root / "features", table, shards=3)
    # finetune_gpt: true is overridden (a warning): GPT-2 stays frozen.
    params = TrainParams(epochs=20, batch_size=8, lr=1e-2, warmup_steps=5, precision="fp32", finetune_gpt=True)
    metrics = train(feats, language_gpt, root / "model", root / "loss.csv", root / "train.json", MAPPER, params,
                    progress=False)
    return root, feats, table, metrics


def test_training_writes_the_trainable_count_and_a_folder_that_loads(trained, language_gpt):
    root, feats, table, metrics = trained
    gpt, _ = load_tiny_gpt(language_gpt)
    c = gpt.config
    assert metrics["params_trainable"] == cross_attention_parameters(c.n_embd, 16, c.n_layer, 2, 1)
    assert metrics["features"] == "patch_tokens"
    assert json.loads((root / "train.json").read_text())["params_trainable"] == metrics["params_trainable"]
    model = ClipCaptioner.load(root / "model")
    assert model.mapper.kind == "cross_attention" and model.feature_dataset == "patch_tokens"
    assert model.finetune_gpt is False  # train.finetune_gpt: true is overridden: GPT-2 stays frozen
    # GPT-2 saved in the folder is the one training started from.
    for name, p in gpt.state_dict().items():
        assert torch.equal(p, model.gpt.state_dict()[name]), name


def test_trained_model_names_what_is_in_the_image(trained):
    root, feats, table, _ = trained
    model = ClipCaptioner.load(root / "model")
    test = [i for i, s in enumerate(table.splits) if s == "test"]
    caps = decode_batch(model, torch.from_numpy(table.patch_tokens[test].astype(np.float32)),
                        Decoding(num_beams=3, max_new_tokens=8), [table.keys[i] for i in test])
    right = sum(caps[j][0].text in table.captions[i] for j, i in enumerate(test))
    assert right >= 0.6 * len(test), [c[0].text for c in caps]  # chance: 1 in 12


def test_batched_beam_search_equals_one_at_a_time(trained):
    root, feats, table, _ = trained
    model = ClipCaptioner.load(root / "model")
    tokens, keys = table.patch_tokens[:12], table.keys[:12]
    params = GEN.model_copy(update={"num_return_sequences": 3})
    one = caption_vectors(model, tokens, params.model_copy(update={"batch_size": 1}), keys, False)
    many = caption_vectors(model, tokens, params, keys, False)
    assert texts(one) == texts(many)
    assert [c.score for caps in one for c in caps] == pytest.approx([c.score for caps in many for c in caps],
                                                                    abs=1e-3)
    assert len({caps[0].text for caps in many}) > 1
    # Sampling: an image's captions depend on the seed and the image only.
    sample = params.model_copy(update={"num_beams": 1, "do_sample": True, "top_k": 3, "seed": 7})
    assert texts(caption_vectors(model, tokens, sample.model_copy(update={"batch_size": 1}), keys, False)) == \
        texts(caption_vectors(model, tokens, sample, keys, False))


def test_generate_reads_the_patch_tokens(trained, tmp_path):
    root, feats, table, _ = trained
    metrics = generate(root / "model", feats, tmp_path / "captions", GEN, progress=False)
    results = json.loads((tmp_path / "captions" / "results.json").read_text())
    assert len(results) == sum(s == "test" for s in table.splits) and metrics


def test_features_without_patch_tokens_name_the_param(tmp_path, tiny_gpt_dir, scene_features, trained):
    plain = scene_features(n_per_class=6)
    params = TrainParams(epochs=1, batch_size=8, precision="fp32")
    with pytest.raises(FeatureShardError, match="clip.patch_tokens: auto or true"):
        train(plain, tiny_gpt_dir, tmp_path / "m", tmp_path / "l.csv", tmp_path / "t.json", MAPPER, params,
              progress=False)
    root = trained[0]
    with pytest.raises(FeatureShardError, match="clip.patch_tokens"):
        generate(root / "model", plain, tmp_path / "captions", GEN, progress=False)


# ------------------------------------------------------------------ streaming
def test_streamed_patch_tokens_keep_a_flat_working_set(tmp_path, tiny_gpt_dir):
    """Above train.max_memory_gb the patch tokens are read shard by shard: the bytes held
    never exceed two windows of shards, however many shards an epoch passes through."""
    table = with_patch_tokens(scene_table(n_per_class=12), tokens=50)
    feats = write_features(tmp_path / "features", table, shards=12)
    _, tok = load_tiny_gpt(tiny_gpt_dir)
    shard_bytes = 12 * 50 * 16 * 2  # 12 images of 50 x 16 fp16 tokens per shard
    data = load_training_data(feats, tok, 20, max_memory_gb=4.5 * shard_bytes / 2**30, dataset="patch_tokens")
    store = data.vectors
    assert isinstance(store, ShardVectors) and data.window == 2
    assert data.feature_bytes == 12 * shard_bytes
    held = []
    for epoch in range(2):
        for batch in epoch_batches(data, 4, 0, epoch, False):
            tokens, _, _ = collate(data.train, store, batch, 0)
            assert tokens.shape == (4, 50, 16) and tokens.dtype == torch.float32
            held.append(store.held_bytes)
    assert max(held) <= 2 * data.window * shard_bytes < data.feature_bytes
    # Every shard was read at some point, and what was read is what was written.
    rows = data.train.rows[:4]
    assert np.array_equal(collate(data.train, store, np.arange(4), 0)[0].numpy(),
                          table.patch_tokens[rows].astype(np.float32))


# ------------------------------------------------------------------ embed
def test_embed_stores_the_vision_towers_last_hidden_state(tmp_path, tiny_clip_dir):
    from pipeline.core.params import ClipParams, DataParams
    from pipeline.embed.shards import embed_shards
    from pipeline.formats.image_shards import iter_shard
    from tests.helpers.images import make_image_dir
    from tests.helpers.models import copy_model, reference_embeddings, reference_patch_tokens

    clip_dir = copy_model(tiny_clip_dir, tmp_path / "clip")
    root = tmp_path / "images"
    make_image_dir(root, shards=2, per_shard=3)
    clip = ClipParams(precision="fp32", batch_size=2, workers=0)
    out = tmp_path / "f"
    summary = embed_shards(root, clip_dir, out, clip, Rank(), DataParams(), progress=False, patch_tokens=True)
    assert summary["patch_tokens"] is True and summary["shards_written"] == 2
    samples = {s.key: s for tar in sorted(root.glob("*.tar")) for s in iter_shard(tar)}
    table = load_features(out, dataset="patch_tokens")
    images = [samples[k].image for k in table.keys]
    ref = reference_patch_tokens(clip_dir, images)
    assert table.embeddings.dtype == np.float16 and table.embeddings.shape == ref.shape
    assert np.abs(table.embeddings.astype(np.float32) - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())
    # The pooled vectors beside them are unchanged.
    vectors = load_features(out).embeddings
    assert np.abs(vectors - reference_embeddings(clip_dir, images)).max() < 1e-5
    # A rerun with the same settings keeps every shard (resume); turning patch tokens off
    # remakes them without (a setting that changes the bytes).
    same = embed_shards(root, clip_dir, out, clip, Rank(), DataParams(), progress=False, patch_tokens=True)
    assert (same["shards_kept"], same["shards_written"]) == (2, 0)
    again = embed_shards(root, clip_dir, out, clip, Rank(), DataParams(), progress=False)
    assert again["shards_written"] == 2
    with pytest.raises(FeatureShardError, match="clip.patch_tokens"):
        load_features(out, dataset="patch_tokens")


# ------------------------------------------------------- caption, export
@pytest.fixture(scope="module")
def captioner_with_clip(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    """A cross-attention model folder with its CLIP (random cross-attention, big enough to matter)."""
    from transformers import AutoConfig

    from tests.helpers.models import clip_feature_attrs, copy_model

    root = tmp_path_factory.mktemp("xattn-caption")
    clip_dir = copy_model(hub_clip_dir, root / "clip")
    width = int(AutoConfig.from_pretrained(clip_dir).vision_config.hidden_size)
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MAPPER.model_dump(), width, gpt, tok,
                                        features=clip_feature_attrs(clip_dir, width))
    for p in model.mapper.parameters():
        p.data.normal_(0, 0.5)
    model.save(root / "model", clip_dir=clip_dir)
    images = []
    rng = np.random.default_rng(0)
    for i in range(3):
        path = root / f"img{i}.png"
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return root, clip_dir, images


def test_caption_reads_patch_tokens_of_the_saved_clip(captioner_with_clip):
    from pipeline.caption.run import caption_inputs
    from tests.helpers.models import reference_patch_tokens

    root, clip_dir, images = captioner_with_clip
    d = Decoding(num_beams=3, max_new_tokens=6)
    results = caption_inputs(root / "model", [str(p) for p in images], d, precision="fp32", batch_size=2,
                             progress=False)
    tokens = reference_patch_tokens(clip_dir, [p.read_bytes() for p in images]).astype(np.float16)
    want = decode_batch(ClipCaptioner.load(root / "model"), torch.from_numpy(tokens.astype(np.float32)), d,
                        [str(p) for p in images])
    assert [r.error for r in results] == [None] * 3
    assert texts([r.captions for r in results]) == texts(want)


@pytest.mark.parametrize("kind", ["onnx", "hf"])
def test_exports_refuse_the_type_clearly(captioner_with_clip, tmp_path, kind):
    from pipeline.export.hf import export_hf
    from pipeline.export.onnx import export_onnx
    from pipeline.models.pretrained import ModelError

    root = captioner_with_clip[0]
    with pytest.raises(ModelError, match="cross_attention cannot be exported"):
        (export_onnx if kind == "onnx" else export_hf)(root / "model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ scst
@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="needs Java")
def test_scst_trains_the_cross_attention_and_leaves_gpt2_alone(trained, tmp_path):
    from pipeline.core.params import ScstParams
    from pipeline.scst.run import scst

    root, feats, _, _ = trained
    params = ScstParams(epochs=2, batch_size=8, lr=1e-3, samples=3, max_tokens=8, precision="fp32")
    scst(root / "model", feats, tmp_path / "model", tmp_path / "reward.csv", tmp_path / "val.csv",
         tmp_path / "scst.json", params, progress=False)
    before, after = ClipCaptioner.load(root / "model"), ClipCaptioner.load(tmp_path / "model")
    assert after.mapper.kind == "cross_attention"
    for name, p in before.gpt.state_dict().items():
        assert torch.equal(p, after.gpt.state_dict()[name]), name
    assert json.loads((tmp_path / "scst.json").read_text())["best_epoch"] in (0, 1, 2)


# ------------------------------------------------------------------ embed plan
def test_embed_plan_changes_only_when_the_answer_does(tmp_path):
    """DVC reruns embed when the plan file's bytes change: switching between prefix mappers
    leaves them as they are; cross_attention (with clip.patch_tokens auto) turns them on."""
    from click.testing import CliRunner

    from pipeline.embed.plan import read_plan
    from stages.cli import capline

    def plan(mapper_type: str, setting: str = "auto") -> bytes:
        params = tmp_path / "params.yaml"
        params.write_text(json.dumps({"mapper": {"type": mapper_type}, "clip": {"patch_tokens": setting}}))
        out = tmp_path / f"plan-{mapper_type}-{setting}.json"
        result = CliRunner().invoke(capline, ["embed-plan", "--params", str(params), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert read_plan(out) == json.loads(out.read_text())["patch_tokens"]
        return out.read_bytes()

    assert plan("mlp") == plan("transformer") == plan("clipgpt") == plan("cross_attention").replace(b"true", b"false")
    assert json.loads(plan("cross_attention"))["patch_tokens"] is True
    assert json.loads(plan("mlp", "true"))["patch_tokens"] is True


def test_embed_refuses_a_plan_the_params_contradict(tmp_path):
    from pipeline.core.errors import ParamsError
    from pipeline.embed.run import run as embed

    stale = tmp_path / "embed_plan.json"
    stale.write_text('{"patch_tokens": false}\n')
    params = parse_params({"mapper": {"type": "cross_attention"}})
    with pytest.raises(ParamsError, match="capline embed-plan"):
        embed(params, tmp_path / "images", tmp_path / "clip", tmp_path / "f", tmp_path / "m.json", Rank(), plan=stale)


# ------------------------------------------------------------------ DDP
def test_ddp_two_processes_equal_one_process(trained, language_gpt, tmp_path):
    """The cross-attention hooks under DistributedDataParallel: 2 gloo processes and 1 process
    with 2 micro-batches end with the same weights."""
    from safetensors.torch import load_file

    from tests.helpers.torchrun import run_torchrun, standalone

    feats = trained[1]
    params = ("mapper: {type: cross_attention, prefix_length: 1, reduce_factor: 2}\n"
              "train: {epochs: 1, batch_size: 8, lr: 0.01, warmup_steps: 1, precision: fp32, log_every: 1, "
              "keep: last, finetune_gpt: false%s}\n")
    out = {}
    for name, nproc, extra in (("two", 2, ""), ("one", 1, ", grad_accum: 2")):
        (tmp_path / f"{name}.yaml").write_text(params % extra)
        d = tmp_path / name
        args = ["train", "--params", str(tmp_path / f"{name}.yaml"), "--features", str(feats), "--gpt",
                str(language_gpt), "--out", str(d / "model"), "--curve", str(d / "loss.csv"), "--val-curve",
                str(d / "val.csv"), "--metrics", str(d / "train.json"), "--checkpoints", str(d / "ck"), "--no-progress"]
        proc = run_torchrun(standalone(nproc, args), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = load_file(str(d / "model" / "mapper.safetensors"))
    assert json.loads((tmp_path / "two" / "train.json").read_text())["world_size"] == 2
    for k in out["one"]:
        assert torch.allclose(out["two"][k], out["one"][k], rtol=1e-4, atol=1e-6), k


def test_serve_captions_as_capline_caption(captioner_with_clip):
    from pipeline.caption.run import caption_inputs
    from pipeline.serve.app import ServeOptions
    from pipeline.serve.run import build_service
    from tests.helpers.serve import ServerThread, post_image

    root, _, images = captioner_with_clip
    d = Decoding(num_beams=2, num_return_sequences=2, max_new_tokens=6)
    want = caption_inputs(root / "model", [str(p) for p in images[:2]], d, device="cpu", precision="fp32",
                          batch_size=1, progress=False)
    options = ServeOptions(max_batch=4, max_wait_ms=50, max_bytes=300_000, body_timeout=5.0)
    with ServerThread(build_service(root / "model", options, d, device="cpu", precision="fp32")) as srv:
        replies = [post_image(srv.port, p.read_bytes()) for p in images[:2]]
    for reply, expected in zip(replies, want):
        assert reply.status == 200, reply
        assert [c["caption"] for c in reply.json()["captions"]] == [c.text for c in expected.captions]
