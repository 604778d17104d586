"""The model card (README.md) of a Hugging Face export: what the model is, how to use and
publish it, what it was trained on, with which params, and its evaluation scores."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# eval.json keys shown in the card, in this order; the baseline and control rows appear when present.
SCORES = ("bleu_4", "meteor", "rouge_l", "cider", "spice", "clip_s", "refclip_s")
ROWS = (("model", ""), ("baseline (best constant caption)", "baseline_"), ("control (shuffled images)", "control_"),
        ("cross-entropy model (before SCST)", "xe_"))
PARAM_SECTIONS = ("data", "clip", "gpt", "mapper", "train", "scst", "generate")


def model_card(captioner: dict, scores: Optional[dict], params: Optional[Path]) -> str:
    mapper = captioner.get("mapper", {})
    features = captioner.get("features", {})
    clip = captioner.get("clip", {})
    gpt = captioner.get("gpt_source", {})
    lines = [
        "---", "pipeline_tag: image-to-text", "library_name: transformers",
        "tags:", "- image-captioning", "- clipcap", "- capline", "---", "",
        "# ClipCap captioner (capline)", "",
        f"A CLIP image vector ({features.get('model_id', '?')}, `{features.get('output', '?')}`, "
        f"{'normalised' if features.get('normalized') else 'not normalised'}) goes through a `{mapper.get('type')}` "
        f"mapper into {captioner.get('prefix_length')} GPT-2 input embeddings, and GPT-2 "
        f"({gpt.get('model_id', '?')}) continues them with a caption (ClipCap, Mokady et al. 2021). "
        "Trained with capline; the code files in this folder need transformers only.", "",
        "## Use", "", "```python",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel, AutoTokenizer", "",
        'model = AutoModel.from_pretrained("DIR_OR_REPO", trust_remote_code=True).eval()',
        'processor = AutoImageProcessor.from_pretrained("DIR_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("DIR_OR_REPO", trust_remote_code=True)  # reads config.json',
        'pixels = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt").pixel_values',
        "ids = model.generate(pixel_values=pixels)  # decoding defaults: generation_config.json",
        "print(tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())", "```", "",
        "Greedy and beam search give `capline caption`'s fp32 captions. Publish with "
        "`huggingface-cli upload USER/NAME DIR` (or `HfApi().upload_folder(repo_id=..., folder_path=DIR)`).", "",
        "## Training data", "",
        f"- image features: {features.get('model_id', '?')} revision `{features.get('model_revision', '?')}`, "
        f"preprocessing `{features.get('preprocess', '?')}`",
        f"- CLIP pin: `{json.dumps({k: v for k, v in clip.items() if k != 'dir'}, sort_keys=True)}`",
        f"- GPT-2 pin: `{json.dumps(gpt, sort_keys=True)}`, fine-tuned: {captioner.get('finetune_gpt')}",
    ]
    sections = _params(params)
    if sections.get("data"):
        lines.append(f"- dataset (params.yaml `data`): `{json.dumps(sections['data'], sort_keys=True)}`")
    lines += ["", "## Params", "", "The model's own settings, then the sections of the params file given to the export "
              "(the project's params.yaml at export time).", "", f"- mapper: `{json.dumps(mapper, sort_keys=True)}`",
              f"- parameters: {captioner.get('params_total')} total, {captioner.get('params_trainable')} trained"]
    lines += [f"- `{name}`: `{json.dumps(value, sort_keys=True)}`" for name, value in sections.items() if name != "data"]
    lines += ["", "## Evaluation", ""] + _scores(scores)
    return "\n".join(lines) + "\n"


def _params(path: Optional[Path]) -> dict:
    if path is None or not Path(path).is_file():
        return {}
    import yaml

    values = yaml.safe_load(Path(path).read_text()) or {}
    return {k: values[k] for k in PARAM_SECTIONS if k in values}


def _scores(scores: Optional[dict]) -> list[str]:
    if not scores:
        return ["No evaluation metrics were given to the export (`capline export --metrics data/metrics/eval.json`)."]
    shown = [k for k in SCORES if any(isinstance(scores.get(p + k), (int, float)) for _, p in ROWS)]
    lines = ["From capline's evaluate stage (`eval.json`, included):", "",
             "| | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for label, prefix in ROWS:
        values = [scores.get(prefix + k) for k in shown]
        if any(isinstance(v, (int, float)) for v in values):
            lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" if isinstance(v, (int, float)) else "" for v in values)
                         + " |")
    return lines
