"""`capline caption`: caption image files, folders, URLs and tar shards with a trained model folder."""
from __future__ import annotations

import sys

import click

from pipeline.core.vocabulary import PRECISIONS

# Decoding options: (field, click type, help). Unset options take the model folder's defaults.
DECODING_OPTIONS = [
    ("num_beams", click.IntRange(min=1), "beam width; 1 = greedy"),
    ("length_penalty", float, "beam search: score = summed log-probability / length ** this"),
    ("no_repeat_ngram_size", click.IntRange(min=0), "no n-gram of this size twice in a caption; 0 = off"),
    ("repetition_penalty", float, "penalty on tokens already in the caption; 1.0 = off"),
    ("min_new_tokens", click.IntRange(min=0), "EOS forbidden before this many tokens"),
    ("max_new_tokens", click.IntRange(min=1), "caption length cap, tokens"),
    ("temperature", float, "sampling only: logits divided by this"),
    ("top_k", click.IntRange(min=0), "sampling only: keep the k most likely tokens; 0 = off"),
    ("top_p", float, "sampling only: nucleus mass; 1.0 = off"),
    ("num_return_sequences", click.IntRange(min=1), "captions per image (n-best, best first)"),
    ("seed", int, "seed of sampling (per image: the same image gets the same captions)"),
]


def decoding_options(command):
    for key, kind, help_text in reversed(DECODING_OPTIONS):
        command = click.option("--" + key.replace("_", "-"), key, type=kind, default=None,
                               help=help_text + " [default: the model folder's]")(command)
    return click.option("--do-sample/--no-do-sample", "do_sample", default=None,
                        help="sample instead of beam search / greedy [default: the model folder's]")(command)


@click.command("caption")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "model_dir", default="data/model", show_default=True, type=click.Path(file_okay=False),
              help="captioner folder (the final model from `capline scst`, or `capline train`'s); it holds its CLIP "
                   "and decoding defaults")
@click.option("--clip", "clip_dir", default=None, type=click.Path(file_okay=False),
              help="CLIP folder, for a model folder trained without one [default: the model folder's clip/]")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="write the results to this file instead of stdout")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "coco", "tsv"]), default=None,
              help="jsonl (every caption, scores, errors), coco (COCO results: first caption per image) or tsv "
                   "(input<TAB>caption) [default: from --out's suffix .jsonl/.json/.tsv, else tsv]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              show_default=True, help="auto: bf16 weights where the device runs bf16 fast, else fp32")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="onnx: ONNX Runtime on a folder from `capline export --format onnx`; auto: onnx for such a folder")
@click.option("--datastore", "datastore_dir", default=None, type=click.Path(file_okay=False),
              help="a retrieval model's datastore (`capline datastore`): each image's nearest captions fill its "
                   "prompt; any datastore made with the model's CLIP")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="images per batch")
@click.option("--progress/--no-progress", default=True, help="progress bar on stderr when there are many images")
@decoding_options
def caption(inputs: tuple[str, ...], model_dir: str, clip_dir: str | None, out_path: str | None, fmt: str | None,
            device: str, precision: str, batch_size: int, progress: bool, backend: str = "auto",
            datastore_dir: str | None = None, **decoding) -> None:
    """Caption INPUTS: image files, folders (recursive), http(s) URLs and image tar shards.

    Every decoding option defaults to the model folder's generation_config.json.
    Results go to stdout or --out. An input that fails (missing, 404, not an image,
    truncated) is reported on stderr with its reason, the others are still captioned,
    and the exit status is 1.
    """
    from pipeline.caption.run import caption_inputs, format_for, format_results, option_name, resolve_decoding
    from pipeline.core.files import write_atomic

    fmt = format_for(out_path, fmt)
    d = resolve_decoding(model_dir, decoding, name=option_name)
    failed = []

    def report(result) -> None:
        if result.error is not None:
            from tqdm import tqdm

            failed.append(result)
            tqdm.write(f"{result.name}\terror: {result.error}", file=sys.stderr)  # above the progress bar

    results = caption_inputs(model_dir, list(inputs), d, clip_dir=clip_dir, device=device, precision=precision,
                             batch_size=batch_size, progress=progress, on_result=report, backend=backend,
                             datastore_dir=datastore_dir)
    text = format_results(results, fmt)
    if out_path is not None:
        write_atomic(out_path, text)
        click.echo(f"{len(results) - len(failed)} images captioned, {len(failed)} failed -> {out_path}", err=True)
    else:
        click.echo(text, nl=False)
    if failed:
        sys.exit(1)
