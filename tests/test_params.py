"""params.yaml is validated at load, and every error names the key."""
from pathlib import Path

import pytest
import yaml

from pipeline.core.params import Params, ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def test_shipped_params_load_and_cover_every_key():
    params = load_params(ROOT / "params.yaml")
    shipped = _flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    schema = _flatten(Params().model_dump())
    # The shipped file documents every key the schema knows, and nothing else.
    assert set(shipped) == set(schema)
    assert params.data.source == "demo"


def test_dvc_stage_params_exist():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            node = shipped
            for part in key.split("."):
                assert part in node, f"stage {name} lists param {key} that params.yaml lacks"
                node = node[part]


def _error(raw) -> str:
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    return str(err.value)


def test_unknown_key_is_named():
    assert "mapper.layer: unknown key" in _error({"mapper": {"layer": 8}})


def test_unknown_section_is_named():
    assert "mapperr: unknown key" in _error({"mapperr": {}})


def test_wrong_type_is_named():
    msg = _error({"train": {"lr": "fast"}})
    assert "train.lr" in msg and "'fast'" in msg


def test_impossible_value_is_named():
    msg = _error({"mapper": {"layers": 0}})
    assert "mapper.layers" in msg and "greater than or equal to 1" in msg


def test_bad_choice_is_named():
    msg = _error({"clip": {"output": "last_hidden_state"}})
    assert "clip.output" in msg and "'last_hidden_state'" in msg


def test_unknown_mapper_type_stops_training_before_anything_is_loaded(tmp_path):
    # mapper.type is checked against the mapper registry (so a new mapper is one file),
    # when the train stage starts: before features or GPT-2 are read.
    from pipeline.models.mapper import MapperConfigError
    from pipeline.train.run import train

    mapper = parse_params({"mapper": {"type": "lstm"}}).mapper
    train_params = parse_params({}).train
    with pytest.raises(MapperConfigError, match="mapper.type: 'lstm' is not one of clipgpt, cross_attention, mlp, transformer"):
        train(tmp_path / "no-features", tmp_path / "no-gpt", tmp_path / "m", tmp_path / "c.csv",
              tmp_path / "t.json", mapper, train_params, progress=False, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "m").exists()


def test_prefix_width_must_match_gpt():
    msg = _error({"mapper": {"width": 100}, "gpt": {"demo": {"n_embd": 128}}})
    assert "mapper.width" in msg and "128" in msg
    # The matching width is accepted.
    assert parse_params({"mapper": {"width": 128}}).mapper.width == 128


def test_heads_must_divide_gpt_width():
    assert "mapper.heads" in _error({"mapper": {"heads": 3}})


def test_nested_section_validator_names_key():
    assert "clip.demo.heads" in _error({"clip": {"demo": {"heads": 3}}})


def test_source_needs_annotations():
    assert "data.annotations" in _error({"data": {"source": "coco"}})


def test_several_errors_are_all_reported():
    msg = _error({"mapper": {"layers": 0}, "train": {"epochs": 0}})
    assert "mapper.layers" in msg and "train.epochs" in msg


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("mapper:\n  layers: -1\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "mapper.layers" in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mapper: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_cli_reports_bad_params_before_work(tmp_path):
    from click.testing import CliRunner

    from stages.cli import capline

    path = tmp_path / "params.yaml"
    path.write_text("mapper:\n  layers: 0\n")
    result = CliRunner().invoke(capline, ["train", "--params", str(path), "--out", str(tmp_path / "model")])
    assert result.exit_code != 0
    assert "mapper.layers" in result.output
    assert not (tmp_path / "model").exists()


def test_device_param():
    assert parse_params({}).device == "auto"
    for name in ("cpu", "cuda", "cuda:3", "mps"):
        assert parse_params({"device": name}).device == name
    for bad in ("tpu", "cuda:x", "gpu0", "CUDA"):
        msg = _error({"device": bad})
        assert msg.startswith("invalid params: device: is not one of auto, cpu, cuda, cuda:N, mps") and repr(bad) in msg


def test_realsize_gpt_width_is_checked():
    assert "mapper.heads" in _error({"gpt": {"model": "realsize"}, "mapper": {"heads": 5}})
    assert parse_params({"gpt": {"model": "realsize"}, "mapper": {"heads": 12}}).mapper.heads == 12


def test_schema_defaults_are_the_shipped_params():
    # One source of defaults: a stage given an empty params file behaves as the demo.
    assert Params().model_dump(mode="json") == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_key_is_described():
    from pydantic import BaseModel

    def undescribed(model, prefix=""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from undescribed(field.annotation, f"{prefix}{name}.")
            elif not field.description:
                yield f"{prefix}{name}"

    assert list(undescribed(Params)) == []


def test_params_reference_is_generated_from_the_schema():
    from pipeline.core.params_doc import markdown

    doc = (ROOT / "docs" / "params.md").read_text()
    assert doc == markdown(ROOT / "dvc.yaml"), "docs/params.md is stale: run `capline params doc > docs/params.md`"
    for key in _flatten(Params().model_dump()):
        assert f"| `{key}` |" in doc, key
