"""The CLIP vision encoder as the embed stage uses it: loaded from a pinned folder,
run batched in the chosen precision under inference_mode."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.embed.precision import DTYPES


class ModelFolderError(ValueError):
    """A CLIP model folder that is missing or incomplete."""


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the safetensors files (sorted by name): the revision of a local model."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelFolderError(f"{model_dir}: no *.safetensors weights")
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_identity(model_dir: Path) -> tuple[str, str]:
    """(model_id, model_revision) from pin.json, else the folder name and weights hash."""
    model_dir = Path(model_dir)
    pin = model_dir / "pin.json"
    info: dict = {}
    if pin.exists():
        try:
            info = json.loads(pin.read_text())
        except json.JSONDecodeError as err:
            raise ModelFolderError(f"{pin}: not valid JSON ({err})") from None
    model_id = info.get("model_id") or model_dir.resolve().name
    revision = info.get("revision") or info.get("sha256") or weights_sha256(model_dir)
    return str(model_id), str(revision)


def load_clip(model_dir: Path) -> tuple[Any, Any]:
    """The vision tower with projection and its image processor, from a local folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelFolderError(f"{model_dir}: not a model folder (no config.json); run the models stage first")
    model = CLIPVisionModelWithProjection.from_pretrained(model_dir, trust_remote_code=False, use_safetensors=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "falling back to the PIL backend" notice is expected
    try:
        processor = CLIPImageProcessor.from_pretrained(model_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), processor


@dataclass
class Encoder:
    """Pixel batches (already normalized, on device) to one vector per image."""

    model: Any
    device: torch.device
    precision: str
    output: str  # "image_embeds" | "pooler_output"
    normalize: bool

    @classmethod
    def build(cls, model: Any, device: torch.device, precision: str, output: str, normalize: bool) -> "Encoder":
        model = model.to(device=device, dtype=DTYPES[precision]).eval()
        return cls(model=model, device=device, precision=precision, output=output, normalize=normalize)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(cfg.projection_dim if self.output == "image_embeds" else cfg.hidden_size)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.device, dtype=DTYPES[self.precision], non_blocking=True)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        out = self.model.visual_projection(pooled) if self.output == "image_embeds" else pooled
        out = out.float()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out
