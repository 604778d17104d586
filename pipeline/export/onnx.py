"""``capline export --format onnx``: a self-sufficient folder that ONNX Runtime captions with.

Layout (read by pipeline/caption/onnx_backend.py):

| file | content |
| --- | --- |
| ``onnx.json`` | format, precision (fp32/int8), graph file names, prefix length, clip dim, GPT-2's config, the feature attributes the captioner was trained on |
| ``clip.onnx``, ``mapper.onnx``, ``decoder.onnx`` | the graphs (pipeline/export/graphs.py) |
| ``preprocessor_config.json`` | CLIP's image processor settings (the embed stage's preprocessing) |
| tokenizer files | GPT-2's tokenizer (``save_pretrained``) |
| ``generation_config.json`` | the model folder's decoding defaults |
| ``eval.json`` | the model's metrics, when given |

With ``quantize="int8"`` every graph's linear layers hold int8 weights
(pipeline/export/quantize.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from pipeline.caption.onnx_backend import FORMAT, FORMAT_VERSION, MANIFEST
from pipeline.core.files import written_whole
from pipeline.models.pretrained import ModelError

GRAPHS = {"clip": "clip.onnx", "mapper": "mapper.onnx", "decoder": "decoder.onnx"}
METRICS_NAME = "eval.json"


def export_onnx(model_dir: str | Path, out: str | Path, quantize: Optional[str] = None,
                metrics: Optional[Path] = None) -> Path:
    from pipeline.export.graphs import export_clip, export_decoder, export_mapper
    from pipeline.export.quantize import quantize_int8
    from pipeline.export.target import check_exportable, check_target
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.models.openclip import is_open_clip_folder
    from pipeline.models.pretrained import load_clip

    if quantize not in (None, "int8"):
        raise ModelError(f"--quantize {quantize!r}: only int8 is supported")
    check_target(Path(out), Path(model_dir), MANIFEST)
    model = ClipCaptioner.load(model_dir)
    check_exportable(model, Path(model_dir))
    if model.clip_dir is None:
        raise ModelError(f"{model_dir}: no clip/ folder (trained without --clip); the export needs the CLIP "
                         "that made its features")
    if is_open_clip_folder(model.clip_dir):
        raise ModelError(f"{model_dir}: its CLIP is an open_clip model; the export handles Hugging Face CLIPs only")
    clip, processor = load_clip(model.clip_dir)
    features = model.features
    image_hw = _image_hw(processor, clip)
    out = Path(out)
    with written_whole(out) as tmp:
        staged = tmp / ".fp32" if quantize else tmp
        staged.mkdir(exist_ok=True)
        export_clip(clip, str(features.get("output", "image_embeds")), bool(features.get("normalized", True)),
                    image_hw, staged / GRAPHS["clip"])
        export_mapper(model.mapper, model.clip_dim, staged / GRAPHS["mapper"])
        export_decoder(model.gpt, staged / GRAPHS["decoder"])
        if quantize:
            for name in GRAPHS.values():
                quantize_int8(staged / name, tmp / name)
            shutil.rmtree(staged)
        processor.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        shutil.copy2(Path(model_dir) / "generation_config.json", tmp / "generation_config.json")
        if metrics is not None and Path(metrics).is_file():
            shutil.copy2(metrics, tmp / METRICS_NAME)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "precision": quantize or "fp32", **GRAPHS,
            "clip_dim": model.clip_dim, "prefix_length": model.prefix_length,
            "gpt_config": _gpt_config(model.gpt.config), "features": features,
            "image_size": list(image_hw), "source": _source(Path(model_dir)),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _image_hw(processor, clip) -> tuple[int, int]:
    """The pixel size CLIP is fed: the crop (or fixed resize) of the processor, else the model's image size."""
    from pipeline.embed.preprocess import Preprocessor

    pre = Preprocessor.from_processor(processor)
    hw = pre.crop_hw or pre.resize_hw
    if hw is None:
        raise ModelError("export: CLIP's processor neither crops nor resizes to a fixed size; the graph needs one")
    return int(hw[0]), int(hw[1])


def _gpt_config(config) -> dict:
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id", "eos_token_id")
    return {k: getattr(config, k) for k in keys}


def _source(model_dir: Path) -> dict:
    """What was exported: the captioner folder's name and its config's identity fields."""
    cfg = json.loads((model_dir / "captioner.json").read_text())
    return {"model_dir": model_dir.resolve().name, "mapper": cfg.get("mapper"), "clip": cfg.get("clip"),
            "gpt_source": cfg.get("gpt_source")}
