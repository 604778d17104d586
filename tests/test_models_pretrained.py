"""Pinning and loading models: local folders stand in for hub ids (same from_pretrained call)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.pin.demo import EOS, PARAGRAPH, TEMPLATE_WORDS, build_demo_clip, build_demo_gpt
from pipeline.core.params import ParamsError
from pipeline.pin.run import run as pin_model
from pipeline.models.pretrained import ModelError, image_processor_class, load_clip, load_gpt, read_pin, weights_sha256
from tests.helpers.models import CAPTIONS, TINY_CLIP, TINY_GPT, save_hub_like_clip, tiny_params


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_captions(folder: Path, captions: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ann = [{"id": i, "image_id": i, "caption": c} for i, c in enumerate(captions)]
    (folder / "captions.json").write_text(json.dumps({"images": [], "annotations": ann}))
    return folder


# ------------------------------------------------------------------- local pinning
def test_pin_local_clip_records_sha_and_reloads_same_outputs(tmp_path, hub_clip_dir):
    src = hub_clip_dir
    out = tmp_path / "pinned"
    pin = pin_model("clip", tiny_params(clip_model=str(src)), out, None)

    assert pin == json.loads((out / "pin.json").read_text())
    assert pin["model_id"] == str(src) and pin["revision"] == "local" and pin["kind"] == "clip"
    assert pin["sha256"] == _sha(out / "model.safetensors") == weights_sha256(out)
    assert not list(tmp_path.glob(".pinned*")), "temporary folder left behind"

    ref_model, ref_proc = load_clip(src)
    model, proc = load_clip(out)
    assert read_pin(out) == pin
    for (name, a), (name_b, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert name == name_b and torch.equal(a, b)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    x, y = ref_proc(images=[img], return_tensors="pt"), proc(images=[img], return_tensors="pt")
    assert torch.equal(x["pixel_values"], y["pixel_values"])
    assert tuple(y["pixel_values"].shape) == (1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref_model(**x).image_embeds, model(**y).image_embeds)


def test_pin_local_gpt_adds_pad_token_and_keeps_weights(tmp_path, hub_gpt_dir):
    src = hub_gpt_dir
    out = tmp_path / "gpt"
    pin = pin_model("gpt", tiny_params(gpt_model=str(src)), out, None)
    assert pin["sha256"] == _sha(out / "model.safetensors") and pin["revision"] == "local"

    model, tok = load_gpt(out)
    assert read_pin(out) == pin
    assert tok.pad_token == tok.eos_token == EOS
    assert tok.pad_token_id == model.config.pad_token_id == model.config.eos_token_id
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(src)
    ids = torch.tensor([tok("a red circle on the left")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, model(ids).logits)


def test_repin_replaces_folder_whole(tmp_path):
    out = tmp_path / "clip"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    pin_model("clip", tiny_params(image_size=16), out, None)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists()


def test_failed_pin_keeps_previous_folder(tmp_path):
    out = tmp_path / "clip"
    first = pin_model("clip", tiny_params(), out, None)
    with pytest.raises(ModelError, match="nowhere"):
        pin_model("clip", tiny_params(clip_model=str(tmp_path / "nowhere")), out, None)
    assert json.loads((out / "pin.json").read_text()) == first
    assert not list(tmp_path.glob(".clip*"))


# ------------------------------------------------------------------- demo builders
def test_demo_clip_deterministic_and_seed_sensitive(tmp_path):
    cfg = TINY_CLIP.model_copy(update={"pretrain_steps": 2})
    build_demo_clip(tmp_path / "a", cfg, 16)
    build_demo_clip(tmp_path / "b", cfg, 16)
    build_demo_clip(tmp_path / "c", cfg.model_copy(update={"seed": 1}), 16)
    a, b, c = (weights_sha256(tmp_path / n) for n in "abc")
    assert a == b != c
    proc = json.loads((tmp_path / "a" / "preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": 16, "width": 16}


def test_demo_clip_pretraining_changes_weights(tmp_path):
    build_demo_clip(tmp_path / "raw", TINY_CLIP, 16)
    build_demo_clip(tmp_path / "pre", TINY_CLIP.model_copy(update={"pretrain_steps": 3}), 16)
    assert weights_sha256(tmp_path / "raw") != weights_sha256(tmp_path / "pre")


def test_demo_clip_rejects_patch_not_dividing_image(tmp_path):
    with pytest.raises(ParamsError, match="patch_size"):
        build_demo_clip(tmp_path / "x", TINY_CLIP.model_copy(update={"patch_size": 5}), 32)


def test_demo_gpt_deterministic_tokenizer_round_trip_and_eos(tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    build_demo_gpt(tmp_path / "a", TINY_GPT, CAPTIONS)
    build_demo_gpt(tmp_path / "b", TINY_GPT, list(reversed(CAPTIONS)))  # order must not matter
    assert weights_sha256(tmp_path / "a") == weights_sha256(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "a")
    words = {w for c in CAPTIONS for w in c.lower().replace(",", " , ").replace(".", " . ")
             .replace(":", " : ").split()}
    words |= {PARAGRAPH, *TEMPLATE_WORDS.split()}  # always there: SmallCap's prompt reads as words
    assert len(tok) == model.config.vocab_size == len(words) + 2  # + EOS and <unk>
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(EOS)
    assert model.config.eos_token_id == model.config.bos_token_id == tok.eos_token_id
    assert model.config.n_positions == TINY_GPT.n_positions

    ids = tok("Two shapes: a blue square, and a green triangle")["input_ids"]
    assert tok.unk_token_id not in ids and tok.eos_token_id not in ids  # no EOS added silently
    assert tok.decode(ids) == "two shapes: a blue square, and a green triangle"
    assert tok("a purple hexagon")["input_ids"].count(tok.unk_token_id) == 2
    # SmallCap's prompt: its words are known and its blank lines keep the captions apart.
    prompt = tok("Similar images show\n\na blue square\n\na green triangle.\n\nThis image shows ")["input_ids"]
    assert tok.unk_token_id not in prompt
    assert tok.convert_ids_to_tokens(prompt).count(PARAGRAPH) == 3
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True).endswith("triangle")


def test_pin_demo_gpt_reads_source_captions(tmp_path):
    src = _write_captions(tmp_path / "source", CAPTIONS)
    pin = pin_model("gpt", tiny_params(), tmp_path / "gpt", src)
    assert pin["model_id"] == "demo" and pin["demo"]["n_embd"] == TINY_GPT.n_embd
    _, tok = load_gpt(tmp_path / "gpt")
    assert tok.unk_token_id not in tok("a big yellow disc")["input_ids"]


def test_pin_demo_gpt_without_source_names_file(tmp_path):
    with pytest.raises(ModelError, match="captions.json"):
        pin_model("gpt", tiny_params(), tmp_path / "gpt", tmp_path / "missing")
    assert not (tmp_path / "gpt").exists()


# ------------------------------------------------------------------------ loading
def test_load_missing_folder_names_it(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path / "absent")):
        load_clip(tmp_path / "absent")


def test_load_corrupt_weights_names_folder(tmp_path):
    out = tmp_path / "gpt"
    pin_model("gpt", tiny_params(), out, _write_captions(tmp_path / "s", CAPTIONS))
    (out / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match=f"gpt model folder {out}"):
        load_gpt(out)


# ---------------------------------------------------------------------------- CLI
def test_models_command_pins_demo_clip(tmp_path):
    from stages.cli import capline

    params = tmp_path / "params.yaml"
    p = tiny_params(image_size=16)
    params.write_text(json.dumps({"data": {"demo": {"image_size": 16}}, "clip": {"demo": p.clip.demo.model_dump()},
                                  "gpt": {"demo": p.gpt.demo.model_dump()}, "mapper": {"heads": 2}}))
    res = CliRunner().invoke(capline, ["models", "clip", "--params", str(params), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    pin = json.loads((tmp_path / "m" / "pin.json").read_text())
    assert pin["sha256"][:12] in res.output and pin["kind"] == "clip"

    bad = CliRunner().invoke(capline, ["models", "gpt", "--params", str(params), "--out", str(tmp_path / "g"),
                                      "--source", str(tmp_path / "nosource")])
    assert bad.exit_code != 0 and "captions.json" in bad.output


# ------------------------------------------------------------- whole CLIP, two towers
def test_pinned_clip_keeps_both_towers_and_a_vision_only_folder_stays_vision_only(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from pipeline.models.pretrained import clip_text_missing, load_clip_text

    src = save_hub_like_clip(tmp_path / "hub_clip")
    out = tmp_path / "pinned"
    pin_model("clip", tiny_params(clip_model=str(src)), out, None)
    assert json.loads((out / "config.json").read_text())["model_type"] == "clip"
    assert clip_text_missing(out) is None
    text, tok = load_clip_text(out)
    ids = tok("A photo depicts a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == text.config.eos_token_id != 2
    assert tok.unk_token_id not in ids

    vision_only = tmp_path / "vision_only"
    CLIPVisionModelWithProjection.from_pretrained(src).save_pretrained(vision_only)
    image_processor_class().from_pretrained(src).save_pretrained(vision_only)
    out2 = tmp_path / "pinned_vision"
    pin_model("clip", tiny_params(clip_model=str(vision_only)), out2, None)
    model, _ = load_clip(out2)
    ref, _ = load_clip(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert "vision tower only" in clip_text_missing(out2)
    with pytest.raises(ModelError, match="vision tower only"):
        load_clip_text(out2)


def test_a_clip_folder_without_vision_weights_is_refused(tmp_path):
    from transformers import CLIPTextModelWithProjection

    src = save_hub_like_clip(tmp_path / "hub_clip")
    text_only = tmp_path / "text_only"
    CLIPTextModelWithProjection.from_pretrained(src).save_pretrained(text_only)
    image_processor_class().from_pretrained(src).save_pretrained(text_only)
    with pytest.raises(ModelError, match="vision tower weights do not fit"):
        load_clip(text_only)


def test_pretraining_twins_differ_in_one_thing():
    import numpy as np

    from pipeline.prepare.scenes import scene_for
    from pipeline.pin.demo import twin_scene

    for i in range(300):
        scene = scene_for(i, 5)
        twin = twin_scene(scene, np.random.default_rng([5, i, 7]))
        a = {(s.slot, s.colour, s.kind, s.size) for s in scene.shapes}
        b = {(s.slot, s.colour, s.kind, s.size) for s in twin.shapes}
        assert a != b and len(a ^ b) <= 2 and abs(len(a) - len(b)) <= 1, (scene, twin)
        assert [s.slot for s in twin.shapes] == sorted((s.slot for s in twin.shapes),
                                                        key=["left", "middle", "right"].index)
        assert twin.index == scene.index and twin.background == scene.background


def test_text_tower_pretraining_leaves_the_image_tower_locked(tmp_path):
    from safetensors.torch import load_file

    base = TINY_CLIP.model_copy(update={"pretrain_steps": 2})
    build_demo_clip(tmp_path / "image_only", base, 16)
    build_demo_clip(tmp_path / "both", base.model_copy(update={"pretrain_text_steps": 3}), 16)
    a, b = load_file(tmp_path / "image_only" / "model.safetensors"), load_file(tmp_path / "both" / "model.safetensors")
    vision = [k for k in a if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in a if k.startswith(("text_model.", "text_projection.", "logit_scale"))]
    assert vision and text
    assert all(torch.equal(a[k], b[k]) for k in vision)
    assert any(not torch.equal(a[k], b[k]) for k in text)


def test_demo_gpt_pretraining_teaches_scene_captions_reproducibly(tmp_path):
    """The demo GPT-2's pre-training (a stand-in for GPT-2's own) lowers its loss on
    dataset captions it never saw, and gives the same weights twice."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from pipeline.prepare.scenes import captions_for, scene_for

    held_out = [c for i in range(40) for c in captions_for(scene_for(i, 0), 2, 0)]  # the dataset's stream
    cfg = TINY_GPT.model_copy(update={"n_positions": 64, "pretrain_steps": 60, "pretrain_documents": 200})
    build_demo_gpt(tmp_path / "a", cfg, held_out)
    build_demo_gpt(tmp_path / "b", cfg, held_out)
    build_demo_gpt(tmp_path / "random", cfg.model_copy(update={"pretrain_steps": 0}), held_out)
    assert weights_sha256(tmp_path / "a") == weights_sha256(tmp_path / "b")

    def loss(folder):
        tok, model = AutoTokenizer.from_pretrained(folder), GPT2LMHeadModel.from_pretrained(folder)
        enc = tok(held_out, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        with torch.no_grad():
            return model(**enc, labels=labels).loss.item()

    # Random weights: about ln(vocabulary); pre-trained: well below.
    assert loss(tmp_path / "a") < 0.6 * loss(tmp_path / "random")
