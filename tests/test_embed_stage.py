"""The `capline embed` command: explicit paths, metrics, errors, and a real torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.core.files import read_metrics
from pipeline.formats.features import load_features
from stages.cli import capline
from tests.helpers.images import make_image_dir
from tests.helpers.models import copy_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("stage")
    make_image_dir(root / "images", shards=3, per_shard=4, corrupt=["img0002"])
    copy_model(tiny_clip_dir, root / "clip", pin={"model_id": "t/clip", "revision": "r9", "sha256": "0" * 64})
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"clip": {"precision": "fp32", "batch_size": 3, "workers": 1}}))
    return root


def args(root, out, metrics, *extra):
    return ["--params", str(root / "params.yaml"), "--images", str(root / "images"), "--model", str(root / "clip"),
            "--out", str(out), "--metrics", str(metrics), *extra]


def test_help_names_options():
    result = CliRunner().invoke(capline, ["embed"] + ["--help"])
    assert result.exit_code == 0
    for opt in ("--images", "--model", "--out", "--metrics", "--rank", "--world-size", "--params"):
        assert opt in result.output


def test_cli_writes_features_and_metrics(setup, tmp_path):
    result = CliRunner().invoke(capline, ["embed"] + args(setup, tmp_path / "f", tmp_path / "m" / "embed.json"))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(tmp_path / "m" / "embed.json")
    assert metrics["images"] == 11 and metrics["failed"] == 1 and metrics["shards_written"] == 3
    assert metrics["precision"] == "fp32" and metrics["device"] == "cpu" and metrics["images_per_s"] > 0
    assert load_features(tmp_path / "f").attrs["model_id"] == "t/clip"


def test_cli_errors_are_clean(setup, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"clip": {"precision": "fp64"}}))
    result = CliRunner().invoke(capline, ["embed"] + ["--params", str(bad)])
    assert result.exit_code != 0 and "clip.precision" in result.output
    result = CliRunner().invoke(capline, ["embed"] + args(setup, tmp_path / "f", tmp_path / "m.json", "--rank", "3",
                                            "--world-size", "2"))
    assert result.exit_code != 0 and "--rank: 3 is outside" in result.output
    result = CliRunner().invoke(capline, ["embed"] + args(setup, tmp_path / "f", tmp_path / "m.json")[:4] +
                                ["--model", str(tmp_path / "none"), "--out", str(tmp_path / "f")])
    assert result.exit_code != 0 and "no config.json" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_equal_single_process(setup, tmp_path):
    single = tmp_path / "single"
    assert CliRunner().invoke(capline, ["embed"] + args(setup, single, tmp_path / "single.json")).exit_code == 0
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(bindir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
           str(bindir / "capline"), "embed", *args(setup, tmp_path / "dist", tmp_path / "dist.json")]
    # Own session: on a timeout the whole tree (torchrun and its workers) is ended.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    a, b = load_features(single), load_features(tmp_path / "dist")
    assert a.keys == b.keys and a.splits == b.splits and a.captions == b.captions
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
    metrics = read_metrics(tmp_path / "dist.json")
    assert metrics["world_size"] == 2 and metrics["images"] == 11 and metrics["shards_written"] == 3


def test_process_group_over_nccl_puts_each_rank_on_its_own_gpu(monkeypatch):
    # all_gather_object uses the current CUDA device: each rank must set its own first.
    import torch
    import torch.distributed as dist

    from pipeline.core.runtime import choose_device, current_rank, gather, process_group

    calls: list = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    rank = current_rank()
    with process_group(rank, choose_device("auto", rank)) as grouped:
        assert grouped and gather({"x": 1}) == [{"x": 1}]
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl"), ("destroy",)]
