"""Hub models without a network: with HF_HUB_OFFLINE=1 a model in the local cache is
pinned (at its resolved commit); a name that cannot be reached is one clear error,
naming the model, the revision and the offline setting, before any other work.

Each case runs `capline models` in a fresh process, as DVC would, so that the hub
libraries read the environment (HF_HOME, HF_HUB_OFFLINE) the way they do in a run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.models import copy_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _capline(args: list[str], cwd: Path, hf_home: Path, offline: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _params(folder: Path, **sections) -> str:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def _cache_snapshot(hf_home: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """The hub cache layout: models--ORG--NAME/refs/main -> snapshots/<commit>/."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.mark.parametrize("kind, model", [("clip", "openai/clip-vit-base-patch32"), ("gpt", "gpt2")])
def test_a_model_missing_offline_is_one_clear_error_before_any_work(tmp_path, kind, model):
    hf_home = tmp_path / "hf"  # empty cache
    params = _params(tmp_path, **{kind: {"model": model, "revision": COMMIT}})
    out = tmp_path / "data" / "models" / kind
    proc = _capline(["models", kind, "--params", params, "--out", str(out), "--source", str(tmp_path / "none")],
                    tmp_path, hf_home)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr  # one line, no traceback
    for part in (f"{kind}.model {model!r}", f"revision {COMMIT!r}", "HF_HUB_OFFLINE=1", str(hf_home / "hub")):
        assert part in lines[0], part
    assert not (tmp_path / "data").exists()  # nothing made, not even the parent folder


def test_a_cached_model_is_pinned_offline_at_its_commit(tmp_path, hub_clip_dir, hub_gpt_dir):
    hf_home = tmp_path / "hf"
    copy_model(hub_clip_dir, _cache_snapshot(hf_home, "test/tiny-clip"))
    copy_model(hub_gpt_dir, _cache_snapshot(hf_home, "test/tiny-gpt"))
    # A branch resolved through refs/, and a commit named as such.
    for kind, model, revision in (("clip", "test/tiny-clip", "main"), ("gpt", "test/tiny-gpt", COMMIT)):
        out = tmp_path / f"{kind}-main"
        params = _params(tmp_path, **{kind: {"model": model, "revision": revision}})
        proc = _capline(["models", kind, "--params", params, "--out", str(out)], tmp_path, hf_home)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pin = json.loads((out / "pin.json").read_text())
        assert pin["model_id"] == model and pin["revision"] == COMMIT, pin
    # The pinned folders are what the later stages load.
    from pipeline.models.pretrained import load_clip, load_gpt, model_identity

    load_clip(tmp_path / "clip-main")
    load_gpt(tmp_path / "gpt-main")
    assert model_identity(tmp_path / "clip-main") == ("test/tiny-clip", COMMIT)
    # A revision the cache does not hold is refused, naming it.
    other = "f" * 40
    params = _params(tmp_path, clip={"model": "test/tiny-clip", "revision": other})
    proc = _capline(["models", "clip", "--params", params, "--out", str(tmp_path / "x")], tmp_path, hf_home)
    assert proc.returncode == 1 and f"revision {other!r}" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
