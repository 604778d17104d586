"""The ``capline`` command: one subcommand per DVC stage, plus ``caption``.

Expected failures (``pipeline.core.errors.CaplineError``: bad params, bad input files,
missing models or tools) become a one-line error and exit status 1 here, in one
place; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib

import click

# Subcommand name -> module in stages/ that defines a click command of that name.
# Modules are imported when the command runs, so `capline --help` stays fast.
COMMANDS = {
    "prepare": "Fetch the dataset spec (or generate the offline demo) into data/source.",
    "models": "Pin CLIP or GPT-2 from the hub (or build the demo's small models).",
    "download": "Fetch images into webdataset tar shards with a status per record.",
    "embed-plan": "Resolve clip.patch_tokens (auto: when mapper.type reads patch tokens) for embed.",
    "embed": "Compute CLIP vectors of image shards into HDF5 feature shards.",
    "datastore": "Encode a caption collection with CLIP's text tower into a FAISS index (retrieval).",
    "retrieve": "Find each image's nearest datastore captions, its own excluded (retrieval).",
    "train": "Train the ClipCap mapper (and optionally GPT-2) on feature shards.",
    "scst": "Fine-tune a captioner with self-critical training (CIDEr-D reward).",
    "generate": "Caption feature shards with batched beam search.",
    "transfer": "Caption a second demo domain with A's datastore and with its own (retrieval).",
    "evaluate": "Score captions with pycocoevalcap and write the HTML report.",
    "caption": "Caption image files with a trained model.",
    "export": "Export a trained model for deployment: ONNX Runtime (fp32/int8) or a Hugging Face folder.",
    "serve": "Serve captions over HTTP (micro-batched) with a trained model.",
    "params": "Apply a recipe from configs/ to params.yaml; check a params file.",
    "import": "Turn ClipCap's or clip-gpt-captioning's released weights into a model folder.",
}
# Commands whose module and click object cannot take the command's name (a Python keyword, a dash).
MODULE_NAMES = {"import": "import_", "embed-plan": "embed_plan"}


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        from pipeline.core.errors import CaplineError

        try:
            return super().invoke(ctx)
        except CaplineError as err:
            raise click.ClickException(str(err)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        attr = MODULE_NAMES.get(name, name)
        module = importlib.import_module(f"stages.{attr}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


@click.group(cls=LazyGroup)
@click.version_option(package_name="capline")
def capline() -> None:
    """Train and evaluate CLIP-prefix image captioners (ClipCap) as a DVC pipeline."""
    _log_to_stderr()


def _log_to_stderr() -> None:
    """The pipeline's own log lines (info and up: resuming, skipped checkpoints) on stderr."""
    import logging

    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


if __name__ == "__main__":
    capline()
