"""Stage metrics: what the inputs decide in the file dvc.lock hashes, wall times beside it."""
from __future__ import annotations

import json

import yaml

from pipeline.core.files import read_metrics, timings_path, write_metrics
from tests.helpers.repo import ROOT


def test_timings_leave_the_hashed_file_and_read_metrics_merges_them(tmp_path):
    metrics = {"images": 11, "failed": 0, "seconds": 1.5, "seconds_model": 0.7, "images_per_s": 7.3,
               "precision": "fp32"}
    write_metrics(tmp_path / "embed.json", metrics)
    assert json.loads((tmp_path / "embed.json").read_text()) == {"images": 11, "failed": 0, "precision": "fp32"}
    assert json.loads(timings_path(tmp_path / "embed.json").read_text()) == {
        "seconds": 1.5, "seconds_model": 0.7, "images_per_s": 7.3}
    assert read_metrics(tmp_path / "embed.json") == metrics
    write_metrics(tmp_path / "again.json", {**metrics, "seconds": 9.9, "images_per_s": 1.0})
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "embed.json").read_bytes()


def test_every_stage_metrics_file_has_its_timings_listed_outside_the_stages():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    staged = {str(m) for stage in dvc["stages"].values() for m in stage.get("metrics", [])}
    listed = set(dvc.get("metrics", []))
    timed = {m for m in staged if not m.endswith("eval.json")}  # evaluate writes scores only
    assert listed == {str(timings_path(m)) for m in timed}
    outs = [str(o) for stage in dvc["stages"].values() for o in stage.get("outs", []) if isinstance(o, str)]
    assert not any(t.startswith(o.rstrip("/") + "/") for t in listed for o in outs)
