"""CLIPScore and RefCLIPScore: the evaluate stage's numbers equal the formulas computed
directly with transformers on a tiny whole CLIP; blank and HTML captions; skipped with
a reason when the CLIP has no text tower."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.evaluate import (CONTROL, REFERENCES, RESULTS, ReportParser, write_coco_pair, write_features,
                                    write_image_shard)
from tests.helpers.models import TINY_CLIP, torch_threads

pytestmark = pytest.mark.skipif(
    subprocess.run(["java", "-version"], capture_output=True).returncode != 0, reason="needs Java")

BLANK, HTML_CAPTION = "img-b", "img-d"  # the fixture's <script> caption is in img-d


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from pipeline.evaluate.run import run as run_evaluate
    from pipeline.pin.demo import build_demo_clip
    from pipeline.core.params import EvaluateParams

    tmp = tmp_path_factory.mktemp("clipscore")
    refs, res, ctl = write_coco_pair(tmp / "captions")
    results = {**RESULTS, BLANK: "   "}
    res.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in results.items()]))
    write_image_shard(tmp / "images" / "00000.tar", list(REFERENCES))
    write_features(tmp / "features")
    clip = tmp / "clip"
    build_demo_clip(clip, TINY_CLIP.model_copy(update={"pretrain_steps": 2, "pretrain_text_steps": 2}), 32)
    metrics = run_evaluate(EvaluateParams(baseline_candidates=5, report_images=6), results=res, references=refs,
                           out=tmp / "eval.json", report_dir=tmp / "eval", control=ctl, images=tmp / "images",
                           features=tmp / "features", clip=clip)
    rows = {r["image_id"]: r for r in map(json.loads, (tmp / "eval" / "per_image.jsonl").read_text().splitlines())}
    return {"tmp": tmp, "clip": clip, "metrics": metrics, "rows": rows, "results": results}


def _direct(clip: Path, images: dict[str, bytes], captions: dict[str, str]) -> dict[str, tuple[float, float]]:
    """CLIP-S and RefCLIP-S from the paper's formulas with transformers' CLIPModel, nothing of ours."""
    import io

    from PIL import Image
    from transformers import AutoTokenizer, CLIPModel
    from pipeline.models.pretrained import image_processor_class

    model = CLIPModel.from_pretrained(clip).eval()
    tok = AutoTokenizer.from_pretrained(clip)
    proc = image_processor_class().from_pretrained(clip)

    def text(t: str) -> np.ndarray:
        enc = tok(["A photo depicts " + t], return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(**enc)
        v = (out if torch.is_tensor(out) else out.pooler_output)[0].numpy()
        return v / np.linalg.norm(v)

    out = {}
    for key, caption in captions.items():
        pixels = proc(images=[Image.open(io.BytesIO(images[key])).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            img = model.get_image_features(**pixels)
        img = (img if torch.is_tensor(img) else img.pooler_output)[0].numpy()
        img = img / np.linalg.norm(img)
        c = text(caption)
        s = 2.5 * max(float(img @ c), 0.0)
        best = max(max(float(text(r) @ c) for r in REFERENCES[key]), 0.0)
        out[key] = (s, 2 * s * best / (s + best) if s + best > 0 else 0.0)
    return out


def _shard_images(path: Path) -> dict[str, bytes]:
    from pipeline.formats.image_shards import iter_shard

    return {s.key: s.image for s in iter_shard(path)}


def test_stage_equals_the_formulas(scored):
    images = _shard_images(scored["tmp"] / "images" / "00000.tar")
    nonblank = {k: c for k, c in scored["results"].items() if c.strip()}
    direct = _direct(scored["clip"], images, nonblank)
    rows, metrics = scored["rows"], scored["metrics"]
    for key, (s, r) in direct.items():
        assert abs(rows[key]["clip_s"] - s) < 1e-5, key
        assert abs(rows[key]["refclip_s"] - r) < 1e-5, key
    assert abs(metrics["clip_s"] - np.mean([rows[k]["clip_s"] for k in rows])) < 1e-9
    assert abs(metrics["refclip_s"] - np.mean([rows[k]["refclip_s"] for k in rows])) < 1e-9
    assert any(s > 0 for s, _ in direct.values())  # not a degenerate all-zero check
    control = _direct(scored["clip"], images, CONTROL)
    for key, (s, r) in control.items():
        assert abs(rows[key]["control_clip_s"] - s) < 1e-5 and abs(rows[key]["control_refclip_s"] - r) < 1e-5
    assert abs(metrics["control_clip_s"] - np.mean([s for s, _ in control.values()])) < 1e-6
    baseline = _direct(scored["clip"], images, {k: metrics["baseline_caption"] for k in REFERENCES})
    assert abs(metrics["baseline_clip_s"] - np.mean([s for s, _ in baseline.values()])) < 1e-6
    assert metrics["clipscore_model"].startswith("clip@")


def test_blank_and_html_captions(scored):
    rows = scored["rows"]
    assert rows[BLANK]["clip_s"] == 0.0 and rows[BLANK]["refclip_s"] == 0.0
    assert rows[HTML_CAPTION]["caption"] == RESULTS[HTML_CAPTION] and rows[HTML_CAPTION]["clip_s"] >= 0.0
    html = (scored["tmp"] / "eval" / "report.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(html)
    assert len(parser.scripts) == 1 and "alert" not in parser.scripts[0]
    assert RESULTS[HTML_CAPTION] in parser.cells
    assert "CLIP-S" in html and "RefCLIP-S" in html


def test_vision_only_clip_is_skipped_with_a_reason(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from pipeline.evaluate.run import run as run_evaluate
    from pipeline.pin.demo import build_demo_clip
    from pipeline.core.params import EvaluateParams

    whole = tmp_path / "whole"
    build_demo_clip(whole, TINY_CLIP, 32)
    vision = tmp_path / "vision"
    CLIPVisionModelWithProjection.from_pretrained(whole).save_pretrained(vision)
    refs, res, _ = write_coco_pair(tmp_path / "captions")
    write_image_shard(tmp_path / "images" / "00000.tar", list(REFERENCES))
    metrics = run_evaluate(EvaluateParams(), results=res, references=refs, out=tmp_path / "m.json",
                           images=tmp_path / "images", clip=vision)
    assert "clip_s" not in metrics and "vision tower only" in metrics["clipscore_skipped"]
    assert "evaluate.clipscore_model" in metrics["clipscore_skipped"]
    # evaluate.clipscore_model naming a whole CLIP folder takes its place.
    from pipeline.evaluate.run import _clipscore_folder, compute_clipscores
    from pipeline.models.pretrained import ModelError

    folder = _clipscore_folder(EvaluateParams(clipscore_model=str(whole)), vision)
    assert folder == whole
    with pytest.raises(ModelError, match="evaluate.clipscore_model"):
        _clipscore_folder(EvaluateParams(clipscore_model=str(tmp_path / "nowhere")), vision)
    scores = compute_clipscores(folder, tmp_path / "images", REFERENCES, {"model": RESULTS})
    assert set(scores["model"].per_image) == set(RESULTS) and scores["model"].clip_s >= 0.0


def test_formulas_on_known_vectors():
    from pipeline.evaluate.clipscore import clip_s, refclip_s

    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    cap = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 0.0]])  # cos 0.6, 0 (clipped), blank
    s = clip_s(img, cap)
    assert np.allclose(s, [1.5, 0.0, 0.0])
    refs = [np.array([[0.6, 0.8], [1.0, 0.0]]), np.array([[-1.0, 0.0]]), np.array([[1.0, 0.0]])]
    r = refclip_s(s, cap, refs)
    assert np.allclose(r, [2 * 1.5 * 1.0 / 2.5, 0.0, 0.0])


def test_negative_cosines_are_clipped_to_zero():
    """CLIP-S is 2.5 * max(cos, 0): a caption pointing away from its image scores 0, not
    below; RefCLIP-S's reference term is clipped the same way, so a caption whose every
    reference points away from it has RefCLIP-S 0 however well it fits the image."""
    from pipeline.evaluate.clipscore import clip_s, refclip_s

    img = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    cap = np.array([[-0.6, 0.8], [0.0, -1.0], [0.6, 0.8], [0.8, 0.6]])  # cos -0.6, -1, 1, 0.8
    s = clip_s(img, cap)
    assert np.allclose(s, [0.0, 0.0, 2.5, 2.0]) and (s >= 0).all()
    refs = [np.array([[-0.6, 0.8]]),  # cos 1 to its caption, but CLIP-S is 0
            np.array([[0.0, 1.0]]),  # cos -1
            np.array([[-0.6, -0.8], [0.8, -0.6]]),  # cos -1 and 0 (the best: 0)
            np.array([[-0.8, -0.6], [-0.6, 0.8]])]  # cos -1 and -0.12: every reference points away
    r = refclip_s(s, cap, refs)
    assert np.allclose(r, [0.0, 0.0, 0.0, 0.0]) and (r >= 0).all()
