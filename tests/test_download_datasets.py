"""Whole specs through both stage commands: COCO + Karpathy and a CC3M TSV over HTTP, and the demo."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from pipeline.formats.records import split_for
from stages.cli import capline
from tests.helpers.datasets import coco_fixture
from tests.helpers.images import decoded, jpeg, read_status, read_tar
from tests.helpers.loopback import Reply


def _run(tmp: Path, data: dict, download: dict | None = None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data, "download": {"records_per_shard": 2, "retries": 0,
                                                                  "decode_processes": 0, **(download or {})}}))
    runner = CliRunner()
    for args in (["prepare", "--params", str(params), "--out", str(tmp / "source"), "--cache", str(tmp / "cache")],
                 ["download", "--params", str(params), "--source", str(tmp / "source"), "--out", str(tmp / "images"),
                  "--metrics", str(tmp / "metrics.json"), "--no-progress"]):
        result = runner.invoke(capline, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return tmp / "images"


def _samples(images: Path) -> dict[str, dict]:
    out = {}
    for tar in sorted(images.glob("*.tar")):
        members = read_tar(tar)
        names = list(members)
        keys = [n.rsplit(".", 1)[0] for n in names[::2]]
        assert keys == sorted(keys) and names == [f"{k}.{e}" for k in keys for e in ("jpg", "json")]
        for k in keys:
            out[k] = {**json.loads(members[f"{k}.json"]), "pixels": decoded(members[f"{k}.jpg"])}
    return out


def test_coco_and_karpathy_over_http(tmp_path, loopback):
    coco, karpathy = coco_fixture(loopback.url("/img"))
    for img in coco["images"]:
        loopback.route(f"/img/{img['id']}.jpg", Reply(200, jpeg(48, 32, seed=img["id"])))
    loopback.route("/img/1000.jpg", Reply(404, b""))
    data = {"source": "coco", "annotations": loopback.route("/captions_val2014.json", Reply(200, json.dumps(coco).encode())),
            "karpathy_split": loopback.route("/dataset_coco.json", Reply(200, json.dumps(karpathy).encode()))}
    images = _run(tmp_path, data, {"resize": 16})
    samples = _samples(images)
    assert sorted(samples) == ["000000000007", "000000000042"]
    assert samples["000000000042"]["split"] == "test" and samples["000000000007"]["split"] == "train"
    assert samples["000000000042"]["captions"] == ["caption 0 of 42", "caption 2 of 42"]
    assert (samples["000000000042"]["width"], samples["000000000042"]["height"]) == (24, 16)
    status = read_status(images / "00001.status.jsonl")
    assert [(s["key"], s["status"]) for s in status] == [("000000001000", "http_error")]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["records"], metrics["ok"], metrics["status_http_error"]) == (3, 2, 1)


def test_cc3m_tsv_over_http(tmp_path, loopback):
    lines = []
    for i in range(5):
        url = loopback.route(f"/cc/{i}.jpg", Reply(200, jpeg(40, 30, seed=i)))
        lines.append(f"a photo of thing {i} <i>&amp;</i>\t{url}")
    tsv = loopback.route("/Train_GCC-training.tsv", Reply(200, ("\n".join(lines) + "\n").encode(), content_type="text/plain"))
    images = _run(tmp_path, {"source": "tsv", "annotations": tsv, "val_fraction": 0.3, "test_fraction": 0.3})
    samples = _samples(images)
    assert sorted(samples) == [f"{i:09d}" for i in range(5)]
    for i in range(5):
        s = samples[f"{i:09d}"]
        assert s["captions"] == [f"a photo of thing {i} <i>&amp;</i>"]  # HTML stays text
        assert s["split"] == split_for(s["url"], 0.3, 0.3)
        assert s["pixels"].shape == (30, 40, 3)
    assert len(list(images.glob("*.tar"))) == 3 and len(list(images.glob("*.status.jsonl"))) == 3


def test_demo_through_file_urls(tmp_path):
    images = _run(tmp_path, {"source": "demo", "demo": {"images": 12, "image_size": 32}})
    manifest = json.loads((tmp_path / "source" / "manifest.json").read_text())
    assert manifest["demo"] and manifest["records"] == 12
    samples = _samples(images)
    assert len(samples) == 12
    karpathy = json.loads((tmp_path / "source" / "dataset_demo.json").read_text())
    assert sorted(s["split"] for s in samples.values()) == sorted(
        {"restval": "train"}.get(i["split"], i["split"]) for i in karpathy["images"])
    assert all(s["url"].startswith("file:images/") and len(s["captions"]) >= 5 for s in samples.values())
    # Relative file URLs: the shards do not depend on where the folder lives.
    again = _run(tmp_path / "elsewhere", {"source": "demo", "demo": {"images": 12, "image_size": 32}})
    assert [p.read_bytes() for p in sorted(images.glob("*"))] == [p.read_bytes() for p in sorted(again.glob("*"))]


def test_help_documents_the_options():
    runner = CliRunner()
    for cmd, options in (("download", ["--source", "--out", "--metrics", "--rank", "--world-size"]),
                         ("prepare", ["--out", "--cache", "--params"])):
        text = runner.invoke(capline, [cmd, "--help"]).output
        assert all(o in text for o in options), text
