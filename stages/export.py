"""`capline export`: a trained model folder as an ONNX Runtime folder or a Hugging Face model folder."""
from __future__ import annotations

import click


@click.command("export")
@click.option("--model", "model_dir", default="data/model", show_default=True, type=click.Path(file_okay=False),
              help="trained model folder (from `capline train` or `capline scst`)")
@click.option("--format", "fmt", type=click.Choice(["onnx", "hf"]), required=True,
              help="onnx: graphs for ONNX Runtime (`capline caption` runs them); hf: a Hugging Face model folder")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="onnx only: int8 weights in the linear layers (dynamic quantisation)")
@click.option("--metrics", default="data/metrics/eval.json", show_default=True, type=click.Path(dir_okay=False),
              help="the model's evaluation metrics, copied in (and into the model card) when the file exists")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="hf only: the params file whose data/model/train sections the model card records, when it exists")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="folder to write")
def export(model_dir: str, fmt: str, quantize: str | None, metrics: str, params_path: str, out_dir: str) -> None:
    """Export the model folder MODEL for deployment into OUT (written whole or not at all)."""
    from pathlib import Path

    from pipeline.core.errors import ParamsError

    if fmt == "onnx":
        from pipeline.export.onnx import export_onnx

        export_onnx(model_dir, out_dir, quantize=quantize, metrics=Path(metrics))
    else:
        if quantize is not None:
            raise ParamsError("--quantize applies to --format onnx only")
        from pipeline.export.hf import export_hf

        export_hf(model_dir, out_dir, metrics=Path(metrics), params=Path(params_path))
    click.echo(f"exported {model_dir} ({fmt}{' ' + quantize if quantize else ''}) -> {out_dir}", err=True)
