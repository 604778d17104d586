"""The `device` param: embed, train and generate run where it says and record it in
their metrics; a device the machine lacks stops each stage before any work, with a
message naming the key (and `capline caption --device` takes the same names)."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import capline
from tests.helpers.images import make_image_dir

SMALL = {
    "clip": {"precision": "fp32", "batch_size": 4, "workers": 0},
    "mapper": {"layers": 1, "heads": 2, "prefix_length": 2, "clip_length": 2},
    "train": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "precision": "fp32"},
    "generate": {"num_beams": 2, "max_new_tokens": 4, "precision": "fp32", "split": "train"},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    make_image_dir(root / "images", shards=1, per_shard=6)
    return root


@pytest.fixture(scope="module")
def models(tiny_clip_dir, tiny_gpt_dir):
    """The CLIP and GPT-2 folders the stages read (shared: the stages only read them)."""
    return {"clip": tiny_clip_dir, "gpt": tiny_gpt_dir}


def _params(root, device: str):
    path = root / f"params-{device.replace(':', '_')}.yaml"
    path.write_text(yaml.safe_dump({"device": device, **SMALL}))
    return str(path)


def _stages(root, models, params, tag):
    out = root / tag
    return {
        "embed": ["embed", "--params", params, "--images", str(root / "images"), "--model", str(models["clip"]),
                  "--out", str(out / "features"), "--metrics", str(out / "embed.json")],
        "train": ["train", "--params", params, "--features", str(root / "cpu" / "features"), "--gpt",
                  str(models["gpt"]), "--clip", str(models["clip"]), "--out", str(out / "model"),
                  "--curve", str(out / "loss.csv"), "--val-curve", str(out / "val.csv"),
                  "--checkpoints", str(out / "checkpoints"), "--metrics", str(out / "train.json"),
                  "--no-progress"],
        "generate": ["generate", "--params", params, "--model", str(root / "cpu" / "model"), "--features",
                     str(root / "cpu" / "features"), "--out", str(out / "captions"), "--metrics",
                     str(out / "generate.json"), "--no-progress"],
    }


@pytest.fixture(scope="module")
def on_cpu(root, models):
    """embed -> train -> generate through the CLI with device: cpu; each stage's output."""
    outputs = {}
    for name, args in _stages(root, models, _params(root, "cpu"), "cpu").items():
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
def test_a_missing_device_stops_each_stage_before_work(on_cpu, models, device, message, monkeypatch):
    import torch

    root = on_cpu  # inputs that would work: only the device is wrong
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    tag = f"no-{device.replace(':', '_')}"
    for name, args in _stages(root, models, _params(root, device), tag).items():
        result = CliRunner().invoke(capline, args)
        assert result.exit_code == 1, f"{name}: {result.output}"
        assert result.output.strip() == f"Error: {message} (torch {torch.__version__}; is it a CPU build?)", name
        assert not (root / tag).exists(), f"{name} wrote before checking the device"
    image = str(next((root / "images").glob("*.tar")))  # any path: the device is checked first
    result = CliRunner().invoke(capline, ["caption", "--model", str(root / "cpu" / "model"), "--clip",
                                          str(models["clip"]), "--device", device, image])
    assert result.exit_code == 1 and f"--device: {device!r} asked for" in result.output
