"""The evaluate stage: score, compare with baseline and control, write metrics and report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional

from tqdm import tqdm

from pipeline.evaluate.baseline import best_constant_caption, frequent_captions
from pipeline.evaluate.chart import metrics_chart
from pipeline.evaluate.clipscore import ClipScores, clipscore_unavailable
from pipeline.evaluate.cocofiles import load_references, load_results
from pipeline.text.java import require_java
from pipeline.evaluate.meteor import Meteor
from pipeline.evaluate.report import collect_thumbnails, render_report, select_rows
from pipeline.evaluate.scores import METRICS, Scores, score_tokenized, tokenize_groups
from pipeline.evaluate.spice import compute_spice, find_corenlp
from pipeline.core.files import CAPTIONED_WITH_FILE, TRANSFER_FIELDS, finite_or_none, write_atomic, write_jsonl, write_metrics
from pipeline.core.params import EvaluateParams

PER_IMAGE = "per_image.jsonl"
REPORT = "report.html"
CHART = "metrics.png"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or not b:
        return None
    return a / b


def training_captions(features: Path) -> list[str]:
    """Every reference caption of the training split of a feature folder."""
    from pipeline.formats.features import load_features

    table = load_features(Path(features), split="train")
    return [c for caps in table.captions for c in caps]


def _captioner(results: Path) -> dict[str, Any]:
    """``retrieval_k`` from the record generate writes beside its results (absent for
    results made elsewhere, which carry no such record)."""
    try:
        record = json.loads((Path(results).parent / CAPTIONED_WITH_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {"retrieval_k": record["retrieval_k"]} if isinstance(record, dict) and "retrieval_k" in record else {}


def transfer_figures(path: Optional[Path]) -> dict[str, Any]:
    """The domain-transfer figures of the transfer stage's summary (null where it did not run)."""
    try:
        summary = json.loads(Path(path).read_text()) if path is not None else {}
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    return {key: summary.get(key) for key in TRANSFER_FIELDS}


def run(
    params: EvaluateParams,
    results: Path,
    references: Path,
    out: Path,
    report_dir: Optional[Path] = None,
    control: Optional[Path] = None,
    features: Optional[Path] = None,
    images: Optional[Path] = None,
    xe: Optional[Path] = None,
    clip: Optional[Path] = None,
    transfer: Optional[Path] = None,
) -> dict[str, Any]:
    """Score ``results`` against ``references``; write the metrics JSON and (optionally) the report.

    ``control`` (shuffled-image results), ``features`` (for the constant-caption
    baseline), ``images`` (report thumbnails and CLIPScore's images), ``xe`` (the
    cross-entropy model's results, before self-critical training) and ``clip``
    (the CLIP whose towers give CLIPScore, unless ``params.clipscore_model`` names
    another) and ``transfer`` (the transfer stage's transfer.json) are optional: an
    absent one is reported as skipped in the metrics (transfer: null figures), never
    an error.
    """
    java = require_java()  # before any work
    refs = load_references(references)
    res = load_results(results, refs)
    metrics: dict[str, Any] = {}

    def optional_results(path: Optional[Path], what: str, key: str) -> Optional[dict[Hashable, str]]:
        if path is None:
            metrics[key] = f"no {what} results given"
        elif not Path(path).exists():
            metrics[key] = f"{what} results file not found: {path}"
        else:
            return load_results(path, refs)
        return None

    ctl = optional_results(control, "control", "control_skipped")
    xe_res = optional_results(xe, "cross-entropy model", "xe_skipped")

    candidates: list[str] = []
    if features is None:
        metrics["baseline_skipped"] = "no feature folder given (the training captions come from it)"
    elif not Path(features).is_dir():
        metrics["baseline_skipped"] = f"feature folder not found: {features}"
    else:
        candidates = frequent_captions(training_captions(Path(features)), params.baseline_candidates)
        if not candidates:
            metrics["baseline_skipped"] = f"no training captions in {features}"

    spice_dir, spice_reason = (None, "evaluate.spice is false")
    if params.spice:
        spice_dir, spice_reason = find_corenlp(params.corenlp_dir)

    clip_dir = _clipscore_folder(params, clip)  # before any work: a bad param is an error
    clip_reason = clipscore_unavailable(clip_dir, images)

    ids = list(res)
    scored = set(ids) | set(ctl or {}) | set(xe_res or {})
    total = (3 + (ctl is not None) + (xe_res is not None) + bool(candidates) + (spice_dir is not None)
             + (clip_reason is None))
    steps = tqdm(total=total, desc="evaluate", unit="step")
    steps.set_postfix_str("PTB tokenization")
    # References in one Java call, every candidate caption (model, control, baseline) in another.
    gts_all = tokenize_groups({i: refs.captions[i] for i in refs.ids if i in scored}, java=java)
    cand = tokenize_groups({"model": [res[i] for i in ids], "control": [ctl[i] for i in ctl] if ctl else [],
                            "xe": [xe_res[i] for i in xe_res] if xe_res else [], "baseline": candidates},
                           java=java)
    gts = {i: gts_all[i] for i in ids}
    res_tok = {i: [t] for i, t in zip(ids, cand["model"])}
    steps.update()

    baseline_scores: Optional[Scores] = None
    control_scores: Optional[Scores] = None
    xe_scores: Optional[Scores] = None
    # METEOR loads its paraphrase table (seconds) while the first set is scored.
    steps.set_postfix_str("model (METEOR starting)")
    with Meteor(java=java) as meteor:
        model = score_tokenized(gts, res_tok, meteor=meteor, java=java)
        steps.update()

        def score_other(name: str, results: Mapping, label: str) -> Scores:
            """A second caption set (the control, the cross-entropy model) against its images' references."""
            steps.set_postfix_str(label)
            other_ids = list(results)
            scores = score_tokenized({i: gts_all[i] for i in other_ids},
                                     {i: [t] for i, t in zip(other_ids, cand[name])}, meteor=meteor)
            steps.update()
            return scores

        if ctl is not None:
            control_scores = score_other("control", ctl, "control")
        if xe_res is not None:
            xe_scores = score_other("xe", xe_res, "cross-entropy model")
        if candidates:
            steps.set_postfix_str(f"baseline ({len(candidates)} candidates)")
            best = best_constant_caption(candidates, cand["baseline"], gts)
            token = cand["baseline"][candidates.index(best.caption)]
            baseline_scores = score_tokenized(gts, {i: [token] for i in ids}, meteor=meteor)
            metrics["baseline_caption"] = best.caption
            steps.update()

    spice: dict[Hashable, float] = {}
    if spice_dir is not None:
        steps.set_postfix_str("SPICE")
        try:
            metrics["spice"], spice = compute_spice(gts, res_tok, spice_dir, java=java)
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            spice_reason = f"SPICE failed: {err}"
        steps.update()
    if "spice" not in metrics:
        metrics["spice_skipped"] = spice_reason

    clip_scores: dict[str, ClipScores] = {}
    if clip_reason is None:
        steps.set_postfix_str("CLIPScore")
        sets = {"model": res, **({"control": ctl} if ctl else {}), **({"xe": xe_res} if xe_res else {})}
        if "baseline_caption" in metrics:
            sets["baseline"] = {i: metrics["baseline_caption"] for i in ids}
        clip_scores = compute_clipscores(clip_dir, images, {i: refs.captions[i] for i in scored}, sets)
        if "model" not in clip_scores:
            clip_reason = f"none of the scored images was found in {images}"
        metrics["clipscore_model"] = _describe_clip(clip_dir)
        steps.update()
    if clip_reason is not None:
        metrics["clipscore_skipped"] = clip_reason

    # Scores first, then the yardsticks, then what was skipped and why.
    out_metrics: dict[str, Any] = dict(model.corpus)
    if "spice" in metrics:
        out_metrics["spice"] = metrics.pop("spice")
    if "model" in clip_scores:
        out_metrics.update(clip_s=clip_scores["model"].clip_s, refclip_s=clip_scores["model"].refclip_s)
    out_metrics["images"] = len(ids)
    out_metrics.update(_captioner(results))
    out_metrics["images_without_result"] = sum(1 for i in refs.ids if refs.captions[i] and i not in res)
    for prefix, s in (("xe", xe_scores), ("baseline", baseline_scores), ("control", control_scores)):
        if s is not None:
            out_metrics.update({f"{prefix}_{m}": v for m, v in s.corpus.items()})
        if prefix in clip_scores:
            out_metrics.update({f"{prefix}_clip_s": clip_scores[prefix].clip_s,
                                f"{prefix}_refclip_s": clip_scores[prefix].refclip_s})
    out_metrics["cider_vs_xe"] = _ratio(model.corpus["cider"], out_metrics.get("xe_cider"))
    out_metrics["cider_vs_baseline"] = _ratio(model.corpus["cider"], out_metrics.get("baseline_cider"))
    out_metrics["cider_vs_control"] = _ratio(model.corpus["cider"], out_metrics.get("control_cider"))
    out_metrics.update(transfer_figures(transfer))
    out_metrics.update(metrics)  # baseline_caption and the *_skipped reasons
    metrics = {k: finite_or_none(v) for k, v in out_metrics.items()}

    per_image = {i: {**model.per_image[i], **({"spice": spice[i]} if i in spice else {})} for i in ids}
    for name, scores in clip_scores.items():
        prefix = "" if name == "model" else f"{name}_"
        for i, values in scores.per_image.items():
            if i in per_image:
                per_image[i].update({prefix + m: v for m, v in values.items()})
    if xe_scores is not None:
        for i, values in xe_scores.per_image.items():
            if i in per_image:
                per_image[i]["xe_cider"] = values["cider"]
    if report_dir is not None:
        steps.set_postfix_str("report")
        write_report(Path(report_dir), params, metrics, per_image, res, refs.captions, ctl, images, xe_res)
    write_metrics(out, metrics)
    steps.update()
    steps.close()
    return metrics


def write_report(
    report_dir: Path,
    params: EvaluateParams,
    metrics: Mapping[str, Any],
    per_image: Mapping[Hashable, Mapping[str, float]],
    captions: Mapping[Hashable, str],
    references: Mapping[Hashable, list[str]],
    control: Optional[Mapping[Hashable, str]] = None,
    images: Optional[Path] = None,
    xe: Optional[Mapping[Hashable, str]] = None,
) -> None:
    """per_image.jsonl, metrics.png and the self-contained report.html in ``report_dir``."""
    write_jsonl(report_dir / PER_IMAGE, (
        {"image_id": i, "caption": captions[i], **({"xe_caption": xe[i]} if xe and i in xe else {}),
         **{m: finite_or_none(v) for m, v in scores.items()}}
        for i, scores in per_image.items()
    ))
    charted = (*METRICS, "spice", *CLIP_METRICS)
    model = {m: metrics[m] for m in charted if isinstance(metrics.get(m), float)}

    def prefixed(prefix: str) -> dict[str, float]:
        return {m: metrics[f"{prefix}_{m}"] for m in charted if isinstance(metrics.get(f"{prefix}_{m}"), float)}

    png = metrics_chart(model, prefixed("baseline"), prefixed("control"), prefixed("xe"))
    write_atomic(report_dir / CHART, png)
    thumbnails: dict[str, str] = {}
    if images is not None and Path(images).is_dir():
        wanted = [str(i) for i in select_rows(per_image, params.report_images)]
        thumbnails = collect_thumbnails(Path(images), wanted, params.thumbnail_size)
    html = render_report(metrics, per_image, captions, references, params.report_images,
                         thumbnails=thumbnails, control_captions=control, chart_png=png, xe_captions=xe)
    write_atomic(report_dir / REPORT, html)


# -------------------------------------------------------------------- CLIPScore
CLIP_METRICS = ("clip_s", "refclip_s")


def _clipscore_folder(params: EvaluateParams, clip: Optional[Path]) -> Optional[Path]:
    """The CLIP folder for CLIPScore: ``evaluate.clipscore_model`` when set, else ``clip``."""
    from pipeline.models.pretrained import ModelError

    name = params.clipscore_model
    if name is None:
        return Path(clip) if clip is not None else None
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(f"evaluate.clipscore_model: {name} is not a folder holding a CLIP saved with "
                         "save_pretrained (config.json missing); pin one with `capline models clip --out FOLDER`")
    return folder


def _describe_clip(folder: Path) -> str:
    from pipeline.models.pretrained import model_identity

    model_id, revision = model_identity(folder)
    return f"{model_id}@{revision[:12]}"


def compute_clipscores(clip_dir: Path, images: Path, references: Mapping[Hashable, list[str]],
                       sets: Mapping[str, Mapping[Hashable, str]]) -> dict[str, ClipScores]:
    """CLIP-S and RefCLIP-S of each caption set (images from the tar shards by key)."""
    from pipeline.evaluate.clipscore import ClipScorer, score_sets

    scorer = ClipScorer.load(clip_dir)
    wanted = {str(i): i for i in references}
    embedded = scorer.images(Path(images), list(wanted))
    return score_sets(scorer, {wanted[k]: v for k, v in embedded.items()}, references, sets)
