"""pipeline/core/checkpoint.py: exact round trips without pickle, identities, whole-or-nothing saves."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core import checkpoint as ck
from pipeline.core.checkpoint import (CheckpointError, Checkpoints, capture_rng, describe_difference, digest_files,
                                 load_checkpoint, restore_rng)

IDENTITY = {"params": {"lr": 0.01, "layers": 2}, "features": "abc", "world_size": 1}


def _parts(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, sched, scaler


def _step(model, opt, sched, scaler):
    x = torch.randn(8, 6)
    noise = float(np.random.rand()) + random.random()  # the numpy and Python RNGs matter too
    loss = (model(x) ** 2).mean() * (1 + noise)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resumed_training_is_bit_identical(tmp_path):
    _seed_all(1)
    model, opt, sched, scaler = _parts()
    ckpts = Checkpoints(tmp_path / "ck", IDENTITY)
    for s in range(1, 4):
        _step(model, opt, sched, scaler)
    ckpts.save(3, modules={"model": model}, stateful={"optimizer": opt, "schedule": sched, "scaler": scaler},
               state={"epoch": 1, "position": 3, "losses": [1.5, float("nan")], "best": None},
               rng=[capture_rng()])
    for s in range(3):
        _step(model, opt, sched, scaler)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    _seed_all(99)  # a fresh process: other weights, other RNG states
    model2, opt2, sched2, scaler2 = _parts(seed=5)
    found = Checkpoints(tmp_path / "ck", IDENTITY).latest()
    assert found is not None and found.step == 3
    state = found.restore(modules={"model": model2},
                          stateful={"optimizer": opt2, "schedule": sched2, "scaler": scaler2})
    restore_rng(found.rng[0])
    assert state["epoch"] == 1 and state["position"] == 3 and state["best"] is None
    assert state["losses"][0] == 1.5 and np.isnan(state["losses"][1])
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    for s in range(3):
        _step(model2, opt2, sched2, scaler2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt, sched, scaler = _parts()
    _step(model, opt, sched, scaler)
    folder = Checkpoints(tmp_path, IDENTITY).save(1, modules={"model": model}, stateful={"optimizer": opt},
                                                  rng=[capture_rng()])
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "tensors.safetensors"]
    meta = json.loads((folder / "checkpoint.json").read_text())  # strict JSON (no NaN)
    assert meta["step"] == 1 and meta["identity"] == IDENTITY
    from safetensors import safe_open

    with safe_open(str(folder / "tensors.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "module/model/0.weight" in names
    assert any(n.startswith("state/optimizer/state/") and n.endswith("exp_avg") for n in names)
    assert any(n.startswith("rng/0/torch") for n in names)


def test_tied_weights_round_trip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    Checkpoints(tmp_path, IDENTITY).save(1, modules={"gpt": gpt})
    torch.manual_seed(1)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    Checkpoints(tmp_path, IDENTITY).latest().restore(modules={"gpt": other})
    for (k, v), w in zip(gpt.state_dict().items(), other.state_dict().values()):
        assert torch.equal(v, w), k
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()  # still tied


def test_other_identity_is_ignored_with_the_reason(tmp_path, caplog):
    model, *_ = _parts()
    Checkpoints(tmp_path, IDENTITY).save(5, modules={"model": model})
    other = {**IDENTITY, "params": {"lr": 0.02, "layers": 2}}
    with caplog.at_level(logging.WARNING, logger="pipeline.core.checkpoint"):
        assert Checkpoints(tmp_path, other).latest() is None
    assert "step-000000005 ignored: made by another run (params.lr: 0.01 there, 0.02 here)" in caplog.text
    assert Checkpoints(tmp_path, dict(IDENTITY)).latest().step == 5


def test_newest_usable_one_wins_and_two_are_kept(tmp_path, caplog):
    model, *_ = _parts()
    ckpts = Checkpoints(tmp_path, IDENTITY, keep=2)
    for step in (10, 20, 30):
        ckpts.save(step, modules={"model": model}, state={"n": step})
    assert ckpts.steps() == [20, 30]
    (ckpts.path(30) / "checkpoint.json").write_text("{not json")  # damaged by hand
    with caplog.at_level(logging.WARNING, logger="pipeline.core.checkpoint"):
        found = ckpts.latest()
    assert found.step == 20 and found.state == {"n": 20}
    assert "step-000000030 ignored" in caplog.text
    ckpts.save(40, prefix="best", modules={"model": model})  # prefixes are kept apart
    assert ckpts.steps("best") == [40] and ckpts.steps() == [20, 30]


def test_a_killed_save_leaves_the_previous_ones_whole(tmp_path, monkeypatch):
    model, *_ = _parts()
    ckpts = Checkpoints(tmp_path, IDENTITY)
    ckpts.save(1, modules={"model": model})
    import safetensors.torch as st

    def dies(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(st, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(2, modules={"model": model})
    monkeypatch.undo()
    assert ckpts.steps() == [1] and ckpts.latest().step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000001"]
    # A temporary left by SIGKILL (no cleanup ran) is never taken for a checkpoint and is removed.
    (tmp_path / ".step-000000002.x1y2.tmp").mkdir()
    assert ckpts.latest().step == 1 and not (tmp_path / ".step-000000002.x1y2.tmp").exists()


def test_restore_refuses_weights_of_another_shape(tmp_path):
    model, *_ = _parts()
    Checkpoints(tmp_path, IDENTITY).save(1, modules={"model": model})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "step-000000001").restore(modules={"model": nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="no state for optimizer"):
        load_checkpoint(tmp_path / "step-000000001").restore(stateful={"optimizer": _parts()[1]})


def test_digest_of_files_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.h5").write_bytes(b"one")
    (tmp_path / "d" / ".a.h5.x.tmp").write_bytes(b"temporary")
    first = digest_files(tmp_path / "d")
    (tmp_path / "d" / ".a.h5.x.tmp").write_bytes(b"other")  # dot-files do not count
    assert digest_files(tmp_path / "d") == first
    (tmp_path / "d" / "a.h5").write_bytes(b"two")
    assert digest_files(tmp_path / "d") != first
    with pytest.raises(CheckpointError, match="not found"):
        digest_files(tmp_path / "nothing")


def test_describe_difference_names_nested_keys():
    text = describe_difference({"a": {"b": 1, "c": 2}, "g": "x"}, {"a": {"b": 1, "c": 3}, "g": "y"})
    assert text == "a.c: 2 there, 3 here; g: 'x' there, 'y' here"


def test_unpicklable_free_encoding_refuses_objects():
    with pytest.raises(CheckpointError, match="without pickle"):
        ck.encode_tree({"f": object()}, {}, "x")
