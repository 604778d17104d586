"""Recipes in configs/: override files holding only what they change, merged into
params.yaml in place and validated as the stages validate params."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.core.params import ParamsError, load_params
from pipeline.core.recipes import apply_recipes, flatten, load_recipe, merge, merged_params, own_keys, rewrite_values
from stages.cli import capline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
HEX40 = re.compile(r"^[0-9a-f]{40}$")

# ClipCap's published settings (paper and train.py / parse_coco.py), as our keys.
CLIPCAP = {
    "clip.model": "openai/clip-vit-base-patch32", "clip.output": "image_embeds", "clip.normalize": False,
    "gpt.model": "gpt2", "mapper.prefix_length": 10, "mapper.heads": 8, "mapper.mlp_ratio": 2.0,
    "mapper.dropout": 0.0, "train.epochs": 10, "train.batch_size": 40, "train.lr": 2e-5,
    "train.warmup_steps": 5000, "train.weight_decay": 0.0, "train.grad_clip": None,
    "generate.num_beams": 5, "generate.max_new_tokens": 67, "generate.length_penalty": 1.0,
    "generate.no_repeat_ngram_size": 0,
}
EXPECTED = {
    "clipcap-coco-transformer.yaml": {**CLIPCAP, "data.source": "karpathy", "mapper.type": "transformer",
                                      "mapper.clip_length": 10, "mapper.layers": 8, "train.finetune_gpt": False},
    "clipcap-coco-mlp.yaml": {**CLIPCAP, "data.source": "karpathy", "mapper.type": "mlp",
                              "train.finetune_gpt": True},
    "clipcap-coco-transformer-prefix40.yaml": {**CLIPCAP, "data.source": "karpathy", "mapper.type": "transformer",
                                               "mapper.prefix_length": 40, "mapper.clip_length": 40,
                                               "mapper.layers": 8, "train.finetune_gpt": False},
    "clipcap-cc3m.yaml": {**CLIPCAP, "data.source": "tsv", "mapper.type": "mlp", "train.finetune_gpt": True},
    # The seed's config (jmisilo/clip-gpt-captioning), split by image instead of by caption.
    "clip-gpt-captioning-flickr30k.yaml": {
        "data.source": "karpathy", "clip.model": "openai/clip-vit-base-patch32", "clip.output": "pooler_output",
        "clip.normalize": False, "gpt.model": "gpt2", "mapper.type": "clipgpt", "mapper.prefix_length": 4,
        "mapper.layers": 6, "mapper.heads": 16, "mapper.forward_expansion": 4, "mapper.dropout": 0.1,
        "train.epochs": 50, "train.batch_size": 2, "train.lr": 2e-5, "train.warmup_steps": 15 * 145_000 // 2,
        "train.weight_decay": 0.0, "train.grad_clip": 1.3, "train.finetune_gpt": True,
        "train.finetune_gpt_layers": ["wte", "wpe", 0, -1, "ln_f"], "train.max_caption_tokens": 20,
        "train.precision": "fp16", "train.seed": 100, "generate.num_beams": 1, "generate.max_new_tokens": 20},
    # SmallCap's settings (its train.py) without retrieval: ViT-B/32 patch tokens, GPT-2 small frozen.
    "smallcap-coco.yaml": {"data.source": "karpathy", "clip.model": "openai/clip-vit-base-patch32",
                           "clip.patch_tokens": "auto", "gpt.model": "gpt2", "mapper.type": "cross_attention",
                           "mapper.reduce_factor": 4, "mapper.prefix_length": 1, "train.lr": 1e-4,
                           "train.batch_size": 64, "train.epochs": 10, "train.finetune_gpt": False},
    "realsize.yaml": {"clip.model": "realsize", "gpt.model": "realsize", "data.demo.style": "photo",
                      "mapper.type": "transformer", "mapper.layers": 8, "train.finetune_gpt": False},
}


def test_every_recipe_is_checked_here():
    assert {p.name for p in RECIPES} == set(EXPECTED)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_holds_only_keys_it_changes(recipe):
    """Each key a recipe sets differs from params.yaml (with its `extends` base applied)."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    parent = yaml.safe_load(recipe.read_text()).get("extends")
    if parent:
        base = merge(base, load_recipe(CONFIGS / parent))
    before = flatten(base)
    own = own_keys(recipe)
    assert own, "an empty recipe"
    same = {k: v for k, v in own.items() if before.get(k) == v}
    assert not same, f"{recipe.name} repeats values it does not change: {same}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_merged_recipe_validates_and_matches_its_setting(recipe):
    merged, params, changes = merged_params(ROOT / "params.yaml", [recipe])
    assert changes
    flat = flatten(params.model_dump())
    wrong = {k: (flat[k], v) for k, v in EXPECTED[recipe.name].items() if flat[k] != v}
    assert not wrong, f"{recipe.name}: (merged, expected) differ: {wrong}"
    for kind in ("clip", "gpt"):
        revision = getattr(params, kind).revision
        if getattr(params, kind).model not in ("demo", "realsize"):
            assert HEX40.match(revision), f"{recipe.name}: {kind}.revision {revision!r} is not pinned to a commit"


def test_apply_rewrites_only_the_changed_values(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text().splitlines()
    recipe = CONFIGS / "clipcap-coco-transformer.yaml"
    result = CliRunner().invoke(capline, ["params", "apply", str(recipe), "--params", str(params)])
    assert result.exit_code == 0, result.output
    after = params.read_text().splitlines()
    merged, _, changes = merged_params(ROOT / "params.yaml", [recipe])
    assert yaml.safe_load(params.read_text()) == merged
    # Same lines, comments and order; a changed line names the recipe that set it.
    assert len(after) == len(before)
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert len(changed) == len(changes)
    assert all(a.rstrip().endswith(f"# {recipe}") for _, a in changed)
    assert all(f"{c.key}: " in result.output for c in changes)
    # The stages read the merged params.
    loaded = load_params(params)
    assert loaded.mapper.layers == 8 and loaded.clip.normalize is False and loaded.train.lr == 2e-5
    # Applying again changes nothing.
    again = CliRunner().invoke(capline, ["params", "apply", str(recipe), "--params", str(params)])
    assert "changed 0 keys" in again.output and params.read_text().splitlines() == after


def test_dry_run_and_show_write_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    text = params.read_text()
    recipe = str(CONFIGS / "realsize.yaml")
    dry = CliRunner().invoke(capline, ["params", "apply", "--dry-run", recipe, "--params", str(params)])
    assert dry.exit_code == 0 and "would change" in dry.output and "clip.model: demo -> realsize" in dry.output
    show = CliRunner().invoke(capline, ["params", "show", recipe, "--params", str(params)])
    assert show.exit_code == 0 and yaml.safe_load(show.output)["gpt"]["model"] == "realsize"
    assert params.read_text() == text


def test_bad_recipes_are_named_and_change_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    text = params.read_text()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("mapper:\n  layer: 8\n")
    result = CliRunner().invoke(capline, ["params", "apply", str(unknown), "--params", str(params)])
    assert result.exit_code == 1 and f"{unknown}: mapper.layer: unknown key" in result.output
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("mapper:\n  layers: 0\n")
    result = CliRunner().invoke(capline, ["params", "apply", str(invalid), "--params", str(params)])
    assert result.exit_code == 1 and "mapper.layers" in result.output and str(invalid) in result.output
    assert params.read_text() == text
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\nmapper:\n  layers: 2\n")
    with pytest.raises(ParamsError, match="cycle"):
        load_recipe(loop)


def test_check_validates_a_params_file(tmp_path):
    ok = CliRunner().invoke(capline, ["params", "check", "--params", str(ROOT / "params.yaml")])
    assert ok.exit_code == 0 and "OK" in ok.output
    bad = tmp_path / "params.yaml"
    bad.write_text("device: tpu\n")
    result = CliRunner().invoke(capline, ["params", "check", "--params", str(bad)])
    assert result.exit_code == 1 and "device" in result.output and "'tpu'" in result.output


def test_recipes_stack_in_order(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    extra = tmp_path / "extra.yaml"
    extra.write_text("mapper:\n  layers: 2\n")
    apply_recipes(params, [CONFIGS / "realsize.yaml", extra])
    loaded = load_params(params)
    assert loaded.mapper.layers == 2 and loaded.gpt.model == "realsize"


def test_rewrite_keeps_comments_quotes_and_adds_missing_keys():
    text = ("# head\n\na:\n  x: 1        # one\n  y: 'has # hash'  # two\n  sub:\n    z: null\n"
            "b:\n  w: true\n")
    out = rewrite_values(text, {"a.x": 2, "a.y": "new: value", "a.sub.z": 3, "a.sub.q": [1, 2], "c.d": "e"})
    assert out.startswith("# head\n\na:\n  x: 2        # one\n")
    assert yaml.safe_load(out) == {"a": {"x": 2, "y": "new: value", "sub": {"z": 3, "q": [1, 2]}},
                                   "b": {"w": True}, "c": {"d": "e"}}
    assert "# two" in out
