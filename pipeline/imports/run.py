"""Released checkpoint + pinned GPT-2 (+ pinned CLIP) -> a capline model folder."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline.imports import clipcap, clipgpt
from pipeline.imports.keymap import Keys, gpt_state
from pipeline.imports.weights import ImportFailed, load_state_dict
from pipeline.models.captioner import ClipCaptioner
from pipeline.models.pretrained import ModelError, load_clip, load_gpt, model_identity, read_pin

log = logging.getLogger(__name__)

# ClipCap's COCO transformer checkpoint reads CLIP RN50x4 vectors: no Hugging Face CLIP
# has them; open_clip's RN50x4 (open_clip:RN50x4/openai) does.
RN50X4_DIM = 640


def import_clipcap(weights: str | Path, mapper: str, prefix_length: int, clip_length: Optional[int],
                   gpt_dir: str | Path, out_dir: str | Path, clip_dir: Optional[str | Path] = None) -> Path:
    """A ClipCap checkpoint (``--mapper mlp|transformer``) as a capline model folder.

    ClipCap's models never learned EOS: they end a caption with '.', where ClipCap's own
    decoder stops. The folder's tokenizer names '.' its end token, so every capline
    decoder stops there too (the period is cut from the text, as EOS is)."""
    keys = Keys(load_state_dict(weights), str(weights))
    gpt, tokenizer = load_gpt(Path(gpt_dir))
    width = int(gpt.config.hidden_size)
    if mapper == "mlp":
        m: nn.Module = clipcap.mlp_mapper(keys, width, prefix_length)
    elif mapper == "transformer":
        m = clipcap.transformer_mapper(keys, width, prefix_length, clip_length)
    else:
        raise ImportFailed(f"--mapper {mapper!r}: one of mlp, transformer")
    if m.config.clip_dim == RN50X4_DIM and clip_dir is None:
        log.warning("%s reads %d-wide CLIP RN50x4 vectors (ClipCap's COCO transformer checkpoint): pin "
                    "clip.model open_clip:RN50x4/openai and pass it as --clip (docs/import.md)", weights, RN50X4_DIM)
    _load_gpt_weights(keys, "gpt.", gpt)
    period = tokenizer.convert_tokens_to_ids(".")
    if period is None or period == tokenizer.unk_token_id:
        raise ImportFailed(f"--gpt {gpt_dir}: its tokenizer has no '.' token, where ClipCap's captions end")
    tokenizer.eos_token = "."
    gpt.config.eos_token_id = period  # load_gpt checks the two agree
    return _write(m, gpt, tokenizer, Path(gpt_dir), "image_embeds", out_dir, clip_dir)


def import_clip_gpt_captioning(weights: str | Path, size: str, gpt_dir: str | Path, out_dir: str | Path,
                               clip_dir: Optional[str | Path] = None) -> Path:
    """A clip-gpt-captioning release (``--size small|large``) as a capline model folder."""
    keys = Keys(load_state_dict(weights), str(weights))
    gpt, tokenizer = load_gpt(Path(gpt_dir))
    m = clipgpt.clipgpt_mapper(keys, size, int(gpt.config.hidden_size))
    _load_gpt_weights(keys, "td.model.", gpt)
    # The seed adds wpe(positions) to its input embeddings by hand and GPT-2 adds them
    # again, so its model sees 2 * wpe. Doubling wpe here gives that forward exactly
    # through GPT-2's own single addition (training, generate and export unchanged).
    with torch.no_grad():
        gpt.transformer.wpe.weight.mul_(2)
    return _write(m, gpt, tokenizer, Path(gpt_dir), "pooler_output", out_dir, clip_dir)


def _load_gpt_weights(keys: Keys, prefix: str, gpt: nn.Module) -> None:
    state = gpt_state(keys, prefix, gpt)
    keys.done()  # every key of the checkpoint is used, or the import stops here
    gpt.load_state_dict(state, strict=True)


def _write(mapper: nn.Module, gpt: nn.Module, tokenizer, gpt_dir: Path, output: str, out_dir: str | Path,
           clip_dir: Optional[str | Path]) -> Path:
    features = {"output": output, "normalized": False, "dim": int(mapper.config.clip_dim)}
    if clip_dir is not None:
        features.update(_clip_identity(Path(clip_dir), output, int(mapper.config.clip_dim)))
    else:
        log.warning("no --clip: the folder will caption features of any %d-wide %s, and `capline caption` "
                    "on image files needs a clip/ folder", features["dim"], output)
    pin = read_pin(gpt_dir)
    base, _ = load_gpt(gpt_dir)
    # Recorded as fine-tuned when the checkpoint's GPT-2 is not the --gpt folder's.
    tuned = any(not torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), base.state_dict().values()))
    model = ClipCaptioner(mapper, gpt, tokenizer, features=features, finetune_gpt=tuned,
                          gpt_source={k: pin[k] for k in ("model_id", "revision", "sha256")})
    return model.save(out_dir, clip_dir=clip_dir)


def _clip_identity(clip_dir: Path, output: str, dim: int) -> dict:
    """The identity features record for ``clip_dir``, after checking its ``output`` is ``dim`` wide."""
    from pipeline.embed.encoder import Encoder

    model, _ = load_clip(clip_dir)
    try:
        got = Encoder.build(model, torch.device("cpu"), "fp32", output, normalize=False).dim
    except ModelError as err:  # an open_clip folder has no pooler_output
        raise ImportFailed(f"--clip {clip_dir}: {err}") from None
    if got != dim:
        raise ImportFailed(f"--clip {clip_dir}: its {output} is {got} wide, the checkpoint's mapper reads {dim}")
    model_id, revision = model_identity(clip_dir)
    return {"model_id": model_id, "model_revision": revision}
