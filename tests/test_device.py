"""The `device` param: embed, train and generate run where it says and record it in
their metrics; a device the machine lacks stops each stage before any work, with a
message naming the key (and `capline caption --device` takes the same names)."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import capline
from tests.helpers_embed import make_image_dir, make_tiny_clip
from tests.helpers_model import save_tiny_gpt, torch_threads

SMALL = {
    "clip": {"precision": "fp32", "batch_size": 4, "workers": 0},
    "mapper": {"layers": 1, "heads": 2, "prefix_length": 2, "clip_length": 2},
    "train": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "precision": "fp32"},
    "generate": {"num_beams": 2, "max_new_tokens": 4, "precision": "fp32", "split": "train"},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    make_image_dir(root / "images", shards=1, per_shard=6)
    make_tiny_clip(root / "clip")
    save_tiny_gpt(root / "gpt")
    return root


def _params(root, device: str):
    path = root / f"params-{device.replace(':', '_')}.yaml"
    path.write_text(yaml.safe_dump({"device": device, **SMALL}))
    return str(path)


def _stages(root, params, tag):
    out = root / tag
    return {
        "embed": ["embed", "--params", params, "--images", str(root / "images"), "--model", str(root / "clip"),
                  "--out", str(out / "features"), "--metrics", str(out / "embed.json")],
        "train": ["train", "--params", params, "--features", str(root / "cpu" / "features"), "--gpt",
                  str(root / "gpt"), "--clip", str(root / "clip"), "--out", str(out / "model"),
                  "--curve", str(out / "loss.csv"), "--val-curve", str(out / "val.csv"),
                  "--checkpoints", str(out / "checkpoints"), "--metrics", str(out / "train.json"),
                  "--no-progress"],
        "generate": ["generate", "--params", params, "--model", str(root / "cpu" / "model"), "--features",
                     str(root / "cpu" / "features"), "--out", str(out / "captions"), "--metrics",
                     str(out / "generate.json"), "--no-progress"],
    }


@pytest.fixture(scope="module")
def on_cpu(root):
    """embed -> train -> generate through the CLI with device: cpu; each stage's output."""
    outputs = {}
    for name, args in _stages(root, _params(root, "cpu"), "cpu").items():
        result = CliRunner().invoke(capline, args)
        assert result.exit_code == 0, f"{name}: {result.output}"
        outputs[name] = result.output
    return root


def test_each_stage_runs_on_the_device_and_records_it(on_cpu):
    root = on_cpu
    for name in ("embed", "train", "generate"):
        metrics = json.loads((root / "cpu" / f"{name}.json").read_text())
        assert metrics["device"] == "cpu", name
    # GPT-2's resolved identity travels with the trained model and its metrics.
    train = json.loads((root / "cpu" / "train.json").read_text())
    config = json.loads((root / "cpu" / "model" / "captioner.json").read_text())
    assert train["gpt_revision"] == config["gpt_source"]["revision"] == "local"
    assert config["gpt_source"]["sha256"] and train["gpt_model_id"] == "gpt"


@pytest.mark.parametrize("device, message", [
    ("cuda", "device: 'cuda' asked for, but torch sees no CUDA device"),
    ("cuda:1", "device: 'cuda:1' asked for, but torch sees no CUDA device"),
])
def test_a_missing_device_stops_each_stage_before_work(on_cpu, device, message, monkeypatch):
    import torch

    root = on_cpu  # inputs that would work: only the device is wrong
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    tag = f"no-{device.replace(':', '_')}"
    for name, args in _stages(root, _params(root, device), tag).items():
        result = CliRunner().invoke(capline, args)
        assert result.exit_code == 1, f"{name}: {result.output}"
        assert result.output.strip() == f"Error: {message} (torch {torch.__version__}; is it a CPU build?)", name
        assert not (root / tag).exists(), f"{name} wrote before checking the device"
    image = str(next((root / "images").glob("*.tar")))  # any path: the device is checked first
    result = CliRunner().invoke(capline, ["caption", "--model", str(root / "cpu" / "model"), "--clip",
                                          str(root / "clip"), "--device", device, image])
    assert result.exit_code == 1 and f"--device: {device!r} asked for" in result.output
