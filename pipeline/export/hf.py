"""``capline export --format hf``: a Hugging Face model folder.

``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` loads it (offline, from the
folder alone) and ``model.generate(pixel_values=...)`` with ``AutoImageProcessor``
and ``AutoTokenizer`` from the same folder gives ``capline caption``'s fp32 captions
for greedy and beam search (capline's seeded per-image sampler is not part of it).
The folder: ``config.json`` (with ``auto_map``), ``model.safetensors`` (CLIP's
vision tower, the mapper, GPT-2), ``configuration_capline.py`` and
``modeling_capline.py`` (self-contained: transformers only, see
pipeline/export/hf_code/), the image processor and tokenizer files,
``generation_config.json`` and a model card ``README.md`` (pipeline/export/card.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from pipeline.core.files import written_whole
from pipeline.models.pretrained import ModelError

CODE = Path(__file__).with_name("hf_code")
CODE_FILES = ("configuration_capline.py", "modeling_capline.py")
WEIGHTS = "model.safetensors"


def export_hf(model_dir: str | Path, out: str | Path, metrics: Optional[Path] = None,
              params: Optional[Path] = None) -> Path:
    from safetensors.torch import save_file

    from pipeline.export.card import model_card
    from pipeline.export.target import check_exportable, check_target
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.models.openclip import is_open_clip_folder
    from pipeline.models.pretrained import load_clip

    model_dir = Path(model_dir)
    check_target(Path(out), model_dir, CODE_FILES[1])
    model = ClipCaptioner.load(model_dir)
    check_exportable(model, Path(model_dir))
    if model.clip_dir is None:
        raise ModelError(f"{model_dir}: no clip/ folder (trained without --clip); the export needs the CLIP "
                         "that made its features")
    if is_open_clip_folder(model.clip_dir):
        raise ModelError(f"{model_dir}: its CLIP is an open_clip model; the export handles Hugging Face CLIPs only")
    clip, processor = load_clip(model.clip_dir)
    captioner = json.loads((model_dir / "captioner.json").read_text())
    features = model.features
    config = {
        "model_type": "capline_clipcap", "architectures": ["CaplineCaptioner"],
        "auto_map": {"AutoConfig": "configuration_capline.CaplineConfig",
                     "AutoModel": "modeling_capline.CaplineCaptioner"},
        "vision_config": clip.config.to_dict(), "text_config": model.gpt.config.to_dict(),
        "mapper": captioner["mapper"], "output": str(features.get("output", "image_embeds")),
        "normalized": bool(features.get("normalized", True)), "torch_dtype": "float32",
    }
    state = {f"vision.{k}": v for k, v in clip.state_dict().items()}
    state.update({f"mapper.{k}": v for k, v in model.mapper.state_dict().items()})
    # lm_head is GPT-2's embedding (tied); the model declares the tie and rebuilds it on load.
    state.update({f"gpt.{k}": v for k, v in model.gpt.state_dict().items() if k != "lm_head.weight"})
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    out = Path(out)
    with written_whole(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in CODE_FILES:
            shutil.copy2(CODE / name, tmp / name)
        processor.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        shutil.copy2(model_dir / "generation_config.json", tmp / "generation_config.json")
        scores = None
        if metrics is not None and Path(metrics).is_file():
            shutil.copy2(metrics, tmp / "eval.json")
            scores = json.loads(Path(metrics).read_text())
        (tmp / "README.md").write_text(model_card(captioner, scores, params))
    return out
