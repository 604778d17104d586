"""Evaluate stage: scores equal COCOEvalCap's, baseline, control, report, CLI, errors."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pipeline.core.files import CAPTIONED_WITH_FILE
from tests.helpers.evaluate import (CONTROL, REFERENCES, RESULTS, SCRIPT_CAPTION, ReportParser,
                                    write_coco_pair, write_features, write_image_shard)

pytestmark = pytest.mark.skipif(
    subprocess.run(["java", "-version"], capture_output=True).returncode != 0, reason="needs Java")

COCO_NAMES = {"Bleu_1": "bleu_1", "Bleu_2": "bleu_2", "Bleu_3": "bleu_3", "Bleu_4": "bleu_4",
              "METEOR": "meteor", "ROUGE_L": "rouge_l", "CIDEr": "cider"}
CLI = [sys.executable, "-m", "stages.cli", "evaluate"]


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def coco_eval_cap(refs: Path, results: Path, monkeypatch_spice=True):
    """pycocoevalcap's own evaluation, as its README runs it (SPICE stood in: it needs a download)."""
    import pycocoevalcap.eval as ev
    from pycocotools.coco import COCO

    class NoSpice:  # SPICE would fetch CoreNLP from the internet; not compared here.
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    real = ev.Spice
    ev.Spice = NoSpice
    try:
        coco = COCO(str(refs))
        coco_res = coco.loadRes(str(results))
        evaluator = ev.COCOEvalCap(coco, coco_res)
        evaluator.params["image_id"] = coco_res.getImgIds()
        evaluator.evaluate()
    finally:
        ev.Spice = real
    return evaluator


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One CLI run on the fixture with control, features, images and SPICE asked for but absent."""
    tmp = tmp_path_factory.mktemp("evaluate")
    refs, res, ctl = write_coco_pair(tmp / "captions")
    (tmp / "captions" / CAPTIONED_WITH_FILE).write_text(json.dumps({"retrieval_k": 3, "datastore": "abc"}))
    write_features(tmp / "features")
    write_image_shard(tmp / "images" / "00000.tar", list(REFERENCES))
    (tmp / "corenlp").mkdir()
    (tmp / "params.yaml").write_text(yaml.safe_dump({"evaluate": {
        "spice": True, "corenlp_dir": str(tmp / "corenlp"), "baseline_candidates": 5,
        "report_images": 6, "thumbnail_size": 32}}))
    proc = run_cli(["--params", "params.yaml", "--results", str(res), "--references", str(refs),
                    "--control", str(ctl), "--features", "features", "--images", "images",
                    "--out", "metrics/eval.json", "--report-dir", "eval"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp / "metrics" / "eval.json").read_text())
    per_image = [json.loads(line) for line in (tmp / "eval" / "per_image.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "refs": refs, "res": res, "ctl": ctl, "metrics": metrics, "per_image": per_image,
            "coco": coco_eval_cap(refs, res), "stdout": proc.stdout}


def test_cli_scores_equal_cocoevalcap(evaluated):
    coco, metrics = evaluated["coco"], evaluated["metrics"]
    assert set(COCO_NAMES) <= set(coco.eval)
    for theirs, ours in COCO_NAMES.items():
        assert abs(metrics[ours] - coco.eval[theirs]) < 1e-9, ours
    assert metrics["images"] == len(RESULTS)
    assert metrics["images_without_result"] == 0
    assert f"cider {metrics['cider']:.4f}" in evaluated["stdout"]


def test_per_image_file_matches_cocoevalcap(evaluated):
    coco, rows = evaluated["coco"], evaluated["per_image"]
    assert [r["image_id"] for r in rows] == list(RESULTS)
    for row in rows:
        assert row["caption"] == RESULTS[row["image_id"]]
        theirs = coco.imgToEval[row["image_id"]]
        for name, ours in COCO_NAMES.items():
            assert abs(row[ours] - theirs[name]) < 1e-9, (row["image_id"], ours)
    # The corpus CIDEr is the mean of the per-image ones.
    assert abs(sum(r["cider"] for r in rows) / len(rows) - evaluated["metrics"]["cider"]) < 1e-12


def test_metrics_say_how_many_retrieved_captions_the_captioner_read(evaluated, tmp_path):
    # generate's record beside the results; results made elsewhere have none, and no key.
    assert evaluated["metrics"]["retrieval_k"] == 3
    from pipeline.evaluate.run import _captioner

    (tmp_path / "results.json").write_text("[]")
    assert _captioner(tmp_path / "results.json") == {}


def test_spice_skipped_with_reason(evaluated):
    metrics = evaluated["metrics"]
    assert "spice" not in metrics
    reason = metrics["spice_skipped"]
    assert str(evaluated["tmp"] / "corenlp") in reason and "stanford-corenlp-3.6.0.jar" in reason


def _direct_cider(refs_by_id: dict, candidates_by_id: dict) -> float:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in caps] for i, caps in refs_by_id.items()})
    res = tok.tokenize({i: [{"caption": c}] for i, c in candidates_by_id.items()})
    return Cider().compute_score(gts, res)[0]


def test_baseline_and_control_in_metrics(evaluated):
    metrics = evaluated["metrics"]
    # Candidates: the 5 most frequent normalised training captions.
    candidates = ["a square", "a red square", "two blue circles", "a green triangle", "a yellow star"]
    ciders = {c: _direct_cider(REFERENCES, {i: c for i in REFERENCES}) for c in candidates}
    best = max(candidates, key=lambda c: ciders[c])
    assert metrics["baseline_caption"] == best
    assert abs(metrics["baseline_cider"] - ciders[best]) < 1e-9
    control = _direct_cider(REFERENCES, CONTROL)
    assert abs(metrics["control_cider"] - control) < 1e-9
    assert abs(metrics["cider_vs_baseline"] - metrics["cider"] / ciders[best]) < 1e-9
    assert abs(metrics["cider_vs_control"] - metrics["cider"] / control) < 1e-9
    for prefix in ("baseline", "control"):
        for name in ("bleu_4", "meteor", "rouge_l"):
            assert 0.0 <= metrics[f"{prefix}_{name}"] <= 1.0


def test_report_escapes_data_and_is_self_contained(evaluated):
    html = (evaluated["tmp"] / "eval" / "report.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(html)
    # Exactly one script: the constant sorting code, none from the data.
    assert len(parser.scripts) == 1 and "alert" not in parser.scripts[0]
    assert SCRIPT_CAPTION not in html and "<b>bold</b>" not in html
    # Every caption and reference reads back exactly as text.
    for key, caption in RESULTS.items():
        assert caption in parser.cells, key
        for ref in REFERENCES[key]:
            assert ref in parser.cells
    assert f"control: {CONTROL['img-a']}" in parser.cells
    assert evaluated["metrics"]["baseline_caption"] in parser.cells
    # Thumbnails and the chart are embedded; nothing is fetched from elsewhere.
    assert sum(src.startswith("data:image/jpeg;base64,") for src in parser.images) == len(RESULTS)
    assert sum(src.startswith("data:image/png;base64,") for src in parser.images) == 1
    assert "http://" not in html and "https://" not in html


def test_chart_is_a_png(evaluated):
    from PIL import Image

    path = evaluated["tmp"] / "eval" / "metrics.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 300


def _children() -> list[int]:
    """Processes whose parent is this one (Java left running would show here)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def test_outside_dvc_int_ids_and_the_report_beside_out(evaluated, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stages.cli import capline

    refs, res, _ = write_coco_pair(tmp_path / "in", int_ids=True)
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _children()
    result = CliRunner().invoke(capline, ["evaluate", "--results", str(res), "--references", str(refs),
                                          "--out", "scores/m.json"])
    assert result.exit_code == 0, result.output
    # Without --report-dir the report goes beside --out; nothing lands in a data/ of the cwd.
    assert sorted(p.name for p in (work / "scores").iterdir()) == ["m.json", "metrics.png", "per_image.jsonl",
                                                                   "report.html"]
    assert sorted(p.name for p in work.iterdir()) == ["scores"]
    metrics = json.loads((work / "scores" / "m.json").read_text())
    for name in COCO_NAMES.values():
        assert abs(metrics[name] - evaluated["metrics"][name]) < 1e-12
    assert "not found" in metrics["control_skipped"] and "not found" in metrics["baseline_skipped"]
    assert metrics["cider_vs_baseline"] is None
    rows = [json.loads(x) for x in (work / "scores" / "per_image.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The tokenizer and METEOR Java processes are gone once the command returns.
    if Path("/proc/self/stat").exists():
        assert _children() == before


def test_java_missing_is_a_clear_error_before_work(tmp_path):
    refs, res, _ = write_coco_pair(tmp_path)
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "bin")}
    proc = run_cli(["--results", str(res), "--references", str(refs), "--out", "m.json"], cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "Java not found" in proc.stderr and "apt-get install openjdk-17-jre-headless" in proc.stderr
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "data").exists()
    # A `java` that does not run is refused the same way.
    fake = tmp_path / "bin" / "java"
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    fake.chmod(0o755)
    proc = run_cli(["--results", str(res), "--references", str(refs), "--out", "m.json"], cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "exited 3" in proc.stderr and "openjdk" in proc.stderr


def test_feature_folder_without_shards_is_a_clean_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stages.cli import capline

    refs, res, _ = write_coco_pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "features").mkdir()
    result = CliRunner().invoke(capline, ["evaluate", "--results", str(res), "--references", str(refs),
                                          "--features", str(tmp_path / "features"), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "no feature shards" in result.stderr and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("results, message", [
    ([{"image_id": "nope", "caption": "x"}], "image_id 'nope' is not in the references"),
    ([{"image_id": "img-a", "caption": "x"}, {"image_id": "img-a", "caption": "y"}], "appears twice"),
    ([{"image_id": "img-a", "caption": None}], "caption must be a string"),
    ({"image_id": "img-a"}, "expected a list"),
])
def test_bad_results_name_the_record_and_keep_old_outputs(tmp_path, results, message):
    from pipeline.evaluate.cocofiles import EvaluationInputError
    from pipeline.evaluate.run import run as run_evaluate
    from pipeline.core.params import EvaluateParams

    refs, res, _ = write_coco_pair(tmp_path)
    res.write_text(json.dumps(results))
    out = tmp_path / "m.json"
    out.write_text("old")
    with pytest.raises(EvaluationInputError, match=message) as err:
        run_evaluate(EvaluateParams(), results=res, references=refs, out=out, report_dir=tmp_path / "r")
    assert str(res) in str(err.value)
    assert out.read_text() == "old" and not (tmp_path / "r").exists()


def test_bad_json_names_the_file(tmp_path):
    from pipeline.evaluate.cocofiles import EvaluationInputError, load_references

    bad = tmp_path / "refs.json"
    bad.write_text('{"annotations": [')
    with pytest.raises(EvaluationInputError, match="refs.json: not valid UTF-8 JSON"):
        load_references(bad)


def test_constant_baseline_picks_the_best_not_the_most_frequent():
    from pipeline.evaluate.baseline import constant_caption_baseline

    # "a shape" is the most frequent but says nothing; the best constant names the common content.
    train = ["a shape"] * 5 + ["A red square."] * 3 + ["a red square"] + ["two blue circles"] * 2 + ["a cat"]
    references = {1: ["a red square", "the square is red"], 2: ["a red square on the left", "red square"],
                  3: ["two blue circles", "blue circles"], 4: ["a big red square", "a square, red"]}
    baseline = constant_caption_baseline(train, references, k=3)
    tried = [c for c, _ in baseline.candidates]
    assert tried == ["a shape", "A red square.", "two blue circles"]
    direct = {c: _direct_cider(references, {i: c for i in references}) for c in tried}
    assert baseline.caption == max(direct, key=direct.get) == "A red square."
    for caption, cider in baseline.candidates:
        assert abs(cider - direct[caption]) < 1e-9


def test_constant_ciders_equal_pycocoevalcap_cider():
    from pycocoevalcap.cider.cider import Cider

    from pipeline.evaluate.baseline import constant_ciders

    rng = random.Random(1)
    words = "a the red blue cat dog sits on mat big small square circle two three".split()
    gts = {i: [" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(rng.randint(1, 5))] for i in range(30)}
    candidates = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(8)] + [""]
    fast = constant_ciders(candidates, gts)
    for caption, value in zip(candidates, fast):
        assert abs(value - Cider().compute_score(gts, {i: [caption] for i in gts})[0]) < 1e-9


def test_tokenizer_equals_pycocoevalcap_concurrently_and_leaves_no_files():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from pipeline.text.tokenizer import JAR, ptb_tokenize

    before = set(os.listdir(JAR.parent))
    batches = [[c for caps in REFERENCES.values() for c in caps][n::3] + list(RESULTS.values()) for n in range(3)]
    out: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda n=n: out.__setitem__(n, ptb_tokenize(batches[n]))) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, batch in enumerate(batches):
        theirs = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in enumerate(batch)})
        assert out[n] == [theirs[k][0] for k in range(len(batch))]
    assert set(os.listdir(JAR.parent)) == before
    # A caption holding a carriage return stays one caption.
    assert ptb_tokenize(["one\rtwo", "Three."]) == ["one two", "three"]


def test_report_rows_are_best_and_worst_halves():
    from pipeline.evaluate.report import render_report, select_rows

    per_image = {f"k{n}": {"cider": float(n), "bleu_4": 0.0, "meteor": 0.0, "rouge_l": 0.0} for n in range(10)}
    assert select_rows(per_image, 4) == ["k9", "k8", "k1", "k0"]
    assert select_rows(per_image, 5) == ["k9", "k8", "k7", "k1", "k0"]
    assert select_rows(per_image, 50) == [f"k{n}" for n in range(9, -1, -1)]
    html = render_report({"cider": 1.0}, per_image, {k: f"cap <{k}>" for k in per_image},
                         {k: ["ref"] for k in per_image}, limit=4)
    parser = ReportParser()
    parser.feed(html)
    assert [c for c in parser.cells if c.startswith("cap ")] == ["cap <k9>", "cap <k8>", "cap <k1>", "cap <k0>"]
    assert "best 2 and worst 2 of 10 images" in html


def test_summary_table_escapes_every_value():
    from pipeline.evaluate.report import render_report

    per_image = {"k0": {"cider": 1.0, "bleu_4": 0.0, "meteor": 0.0, "rouge_l": 0.0}}
    hostile = '<script>alert("x")</script> & <b>bold</b>'
    metrics = {"cider": 1.0, "baseline_cider": 0.5, "images": 1, "baseline_caption": hostile,
               "spice_skipped": "<img src=x onerror=alert(1)>"}
    html = render_report(metrics, per_image, {"k0": "a cap"}, {"k0": ["ref"]}, limit=4)
    summary = html[html.index("<table id=summary>"):]
    summary = summary[:summary.index("</table>")]
    assert "<script>" not in summary and "<img" not in summary and "<b>" not in summary
    parser = ReportParser()
    parser.feed(summary)
    assert hostile in parser.cells and "<img src=x onerror=alert(1)>" in parser.cells


def test_find_corenlp(tmp_path):
    from pipeline.evaluate.spice import CORENLP_JARS, find_corenlp

    folder, reason = find_corenlp(str(tmp_path))
    assert folder is None and CORENLP_JARS[0] in reason and CORENLP_JARS[1] in reason
    (tmp_path / CORENLP_JARS[0]).write_bytes(b"")
    folder, reason = find_corenlp(str(tmp_path))
    assert folder is None and CORENLP_JARS[0] not in reason.split("missing")[1]
    (tmp_path / CORENLP_JARS[1]).write_bytes(b"")
    assert find_corenlp(str(tmp_path)) == (tmp_path, "")


def test_java_that_fails_while_scoring_is_a_clear_error(tmp_path):
    refs, res, _ = write_coco_pair(tmp_path)
    (tmp_path / "bin").mkdir()
    # Answers `java -version` like a JVM, then fails as a crashing scorer would.
    fake = tmp_path / "bin" / "java"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-version" ]; then echo \'openjdk version "17"\' >&2; exit 0; fi\n'
                    "echo 'Exception in thread main' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cli(["--results", str(res), "--references", str(refs), "--out", "m.json"], cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "PTB tokenizer" in proc.stderr and "Exception in thread main" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.json").exists()
