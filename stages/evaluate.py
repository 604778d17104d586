"""`capline evaluate`: score captions with pycocoevalcap and write the report."""
from __future__ import annotations

from pathlib import Path

import click

from stages.common import load, params_option

_file = click.Path(dir_okay=False, path_type=Path)
_dir = click.Path(file_okay=False, path_type=Path)
DEFAULT_OUT = Path("data/metrics/eval.json")
DEFAULT_REPORT_DIR = Path("data/eval")


def report_folder(out: Path, report_dir: Path | None) -> Path:
    """``report_dir`` if given; else the DAG's data/eval for the DAG's metrics file, else the folder of ``out``.

    A run outside DVC that names its own --out must not write into a data/eval/ of
    whatever folder it was started from.
    """
    if report_dir is not None:
        return report_dir
    return DEFAULT_REPORT_DIR if out == DEFAULT_OUT else out.parent


@click.command("evaluate")
@params_option
@click.option("--results", type=_file, default=Path("data/captions/results.json"), show_default=True,
              help="COCO results file to score: [{image_id, caption}] (int or str ids)")
@click.option("--references", type=_file, default=Path("data/captions/references.json"), show_default=True,
              help="COCO captions file with the reference captions")
@click.option("--control", type=_file, default=Path("data/captions/results_shuffled.json"), show_default=True,
              help="results of the same model on shuffled image features (the control); skipped if absent")
@click.option("--features", type=_dir, default=Path("data/features"), show_default=True,
              help="feature shards whose training captions give the constant-caption baseline; skipped if absent")
@click.option("--images", type=_dir, default=Path("data/images"), show_default=True,
              help="image tar shards for the report's thumbnails; skipped if absent")
@click.option("--xe", type=_file, default=Path("data/captions_xe/results.json"), show_default=True,
              help="results of the cross-entropy model (before self-critical training); skipped if absent")
@click.option("--clip", type=_dir, default=Path("data/models/clip"), show_default=True,
              help="whole CLIP (vision and text towers) for CLIPScore, unless evaluate.clipscore_model names "
                   "another; skipped if absent or vision-only")
@click.option("--transfer", type=_file, default=Path("data/transfer/transfer.json"), show_default=True,
              help="the transfer stage's summary: its transfer_* figures join the metrics; null if absent")
@click.option("--out", type=_file, default=DEFAULT_OUT, show_default=True,
              help="metrics JSON to write (flat: bleu_1..bleu_4, meteor, rouge_l, cider, baseline_*, control_*)")
@click.option("--report-dir", type=_dir, default=None,
              help="folder for per_image.jsonl, report.html and metrics.png  [default: data/eval with the default "
                   "--out, else the folder of --out]")
def evaluate(params_path: str, results: Path, references: Path, control: Path, features: Path,
             images: Path, xe: Path, clip: Path, transfer: Path, out: Path, report_dir: Path | None) -> None:
    """Score generated captions against references, exactly as pycocoevalcap's COCOEvalCap.

    Writes BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when evaluate.corenlp_dir
    holds Stanford CoreNLP), CLIP-S and RefCLIP-S (when a whole CLIP and the images
    are there) with the cross-entropy model, the constant-caption baseline and the
    shuffled-image control, per-image scores, an HTML report and a chart. Needs Java.

    With no options it scores the DAG's files and writes the report to data/eval, as
    the DVC stage does. Outside DVC, any COCO pair works; with --out the report goes
    beside METRICS.json unless --report-dir names a folder:

    \b
    capline evaluate --results RES.json --references REFS.json --out METRICS.json
    """
    import os

    from pipeline.evaluate.run import run

    # Outside DVC the default params file may be absent: then every evaluate default applies.
    if os.path.exists(params_path) or params_path != "params.yaml":
        section = load(params_path).evaluate
    else:
        from pipeline.core.params import EvaluateParams

        section = EvaluateParams()
    report_dir = report_folder(out, report_dir)
    metrics = run(section, results=results, references=references, out=out,
                           report_dir=report_dir, control=control, features=features, images=images,
                           xe=xe, clip=clip, transfer=transfer)
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("bleu_4", "meteor", "rouge_l", "cider", "clip_s", "refclip_s")
                      if isinstance(metrics.get(k), float))
    click.echo(f"{metrics['images']} images: {shown}")
    for k in ("xe_cider", "baseline_cider", "control_cider"):
        if isinstance(metrics.get(k), float):
            click.echo(f"{k} {metrics[k]:.4f}")
    click.echo(f"metrics: {out}; report: {report_dir / 'report.html'}")
