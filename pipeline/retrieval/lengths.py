"""Which captions enter the datastore: not empty, and at most ``max_caption_tokens``
tokens of the captioner's GPT-2 tokenizer (SmallCap's 25), since the retrieved
captions are read by GPT-2 in the prompt and that is where their length costs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.core.errors import CaplineError
from pipeline.retrieval.captions import Caption

TOKENIZE_BATCH = 4096


@dataclass
class Kept:
    captions: list[Caption] = field(default_factory=list)
    read: int = 0
    dropped_empty: int = 0
    dropped_too_long: int = 0


def load_tokenizer(gpt_dir: Path) -> Any:
    """The GPT-2 tokenizer of a model folder (the tokenizer alone: no weights are loaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(gpt_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a missing or damaged folder
        raise CaplineError(f"gpt model folder {gpt_dir}: cannot load its tokenizer "
                           f"({type(err).__name__}: {err}); run `capline models gpt`") from None


def keep_short(captions: Sequence[Caption], tokenizer: Any, max_tokens: int) -> Kept:
    """Drop empty captions and those over ``max_tokens`` tokens (no special tokens counted), counting each."""
    out = Kept(read=len(captions))
    texts = [c for c in captions if c.text]
    out.dropped_empty = len(captions) - len(texts)
    for lo in range(0, len(texts), TOKENIZE_BATCH):
        part = texts[lo:lo + TOKENIZE_BATCH]
        ids = tokenizer([c.text for c in part], add_special_tokens=False)["input_ids"]
        for caption, row in zip(part, ids):
            if len(row) <= max_tokens:
                out.captions.append(caption)
            else:
                out.dropped_too_long += 1
    return out
