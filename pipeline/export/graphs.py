"""The three graphs of an ONNX export, as torch modules and their export.

``clip.onnx``: pixel values [B, 3, H, W] -> the vector the captioner was trained on
(the recorded output kind, normalised when the features were); ``mapper.onnx``:
vectors [B, clip_dim] -> prefix [B, K, n_embd]; ``decoder.onnx``: GPT-2's step
(pipeline/export/decoder.py). Exported by torch's TorchScript exporter, opset 17,
with dynamic batch (and sequence) axes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.export.decoder import GptStep, io_names

OPSET = 17


class ClipTower(nn.Module):
    """CLIP's vision side exactly as pipeline/embed/encoder.py runs it (fp32)."""

    def __init__(self, clip, output: str, normalize: bool) -> None:
        super().__init__()
        self.vision = clip.vision_model
        self.projection = clip.visual_projection if output == "image_embeds" else None
        self.normalize = normalize

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixel_values).pooler_output
        if self.projection is not None:
            out = self.projection(out)
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.TransformerEncoderLayer's fused inference kernel (the transformer mapper's) has no ONNX form.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_clip(clip, output: str, normalize: bool, image_hw: tuple[int, int], path: Path) -> None:
    pixels = torch.zeros(2, 3, *image_hw)
    _export(ClipTower(clip, output, normalize).float(), (pixels,), path, ["pixel_values"], ["features"],
            {"pixel_values": {0: "batch"}, "features": {0: "batch"}})


def export_mapper(mapper: nn.Module, clip_dim: int, path: Path) -> None:
    _export(mapper.float(), (torch.zeros(2, clip_dim),), path, ["features"], ["prefix"],
            {"features": {0: "batch"}, "prefix": {0: "batch"}})


def export_decoder(gpt, path: Path) -> None:
    cfg = gpt.config
    n_layer, n_head, width = int(cfg.n_layer), int(cfg.n_head), int(cfg.n_embd)
    inputs, outputs = io_names(n_layer)
    # Example sizes above 1 everywhere, so that no axis is traced as a constant.
    past = [torch.zeros(2, n_head, 3, width // n_head) for _ in range(2 * n_layer)]
    args = (torch.zeros(2, 2, width), torch.zeros(2, 2, dtype=torch.long), *past)
    axes = {"inputs_embeds": {0: "batch", 1: "embeds"}, "input_ids": {0: "batch", 1: "tokens"},
            "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past"} for name in inputs[2:]})
    axes.update({name: {0: "batch", 2: "steps"} for name in outputs[1:]})
    _export(GptStep(gpt.float()), args, path, inputs, outputs, axes)
