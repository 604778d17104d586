"""A retrieval captioner's prompt as GPT-2 tokens, and the layout GPT-2 reads it in.

The prompt is ``template`` with ``{captions}`` replaced by the k retrieved captions
joined by ``separator`` (SmallCap's: a blank line; SmallCap's template: ``Similar images show\\n\\n{cap1}\\n\\n...
{capk}.\\n\\nThis image shows ``). It is tokenised in pieces (head, each caption cut
to ``max_caption_tokens``, separators, tail), so its length has a bound known before
any caption is seen: generation reserves it, and a caption's room does not depend on
its batch.

GPT-2 reads ``[prefix] + prompt`` left-padded to the longest in the batch, with the
attention mask and position ids (the cumulative sum of the mask) that make a padded
row read exactly as it would alone; ``left_pack`` moves the padding to the left,
as transformers' ``generate`` expects it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

SEPARATOR = "\n\n"
SLOT = "{captions}"


@dataclass(frozen=True)
class RetrievalSettings:
    """What a captioner was trained to read in its prompt; k=0: no prompt (the plain captioner)."""

    k: int = 0
    template: Optional[str] = None
    max_caption_tokens: int = 0
    separator: str = SEPARATOR
    # The datastore its training prompts came from: model_id, model_revision (its CLIP), fingerprint.
    datastore: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k > 0 and (self.template is None or self.template.count(SLOT) != 1):
            raise ValueError(f"retrieval template must hold {SLOT} exactly once, got {self.template!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "RetrievalSettings":
        values = dict(values or {})
        return cls(k=int(values.get("k", 0)), template=values.get("template"),
                   max_caption_tokens=int(values.get("max_caption_tokens", 0)),
                   separator=values.get("separator", SEPARATOR),
                   datastore=dict(values.get("datastore") or {}))

    def text(self, captions: Sequence[str]) -> str:
        """The prompt as text (what the token ids spell, up to caption cuts)."""
        head, tail = self.template.split(SLOT)
        return head + self.separator.join(c.strip() for c in captions) + tail

    def _pieces(self, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
        head, tail = self.template.split(SLOT)
        enc = tokenizer([head, self.separator, tail], add_special_tokens=False)["input_ids"]
        return list(enc[0]), list(enc[1]), list(enc[2])

    def max_tokens(self, tokenizer: Any) -> int:
        """The longest prompt: its bound on GPT-2's positions (0 without retrieval)."""
        if self.k == 0:
            return 0
        head, sep, tail = self._pieces(tokenizer)
        return len(head) + len(tail) + self.k * self.max_caption_tokens + (self.k - 1) * len(sep)

    def token_ids(self, tokenizer: Any, captions: Sequence[Sequence[str]]) -> list[list[int]]:
        """Prompt ids of each image from its retrieved captions (the first k of each)."""
        head, sep, tail = self._pieces(tokenizer)
        flat = [c.strip() for caps in captions for c in list(caps)[:self.k]]
        enc = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out, i = [], 0
        for caps in captions:
            ids = list(head)
            for j in range(min(len(caps), self.k)):
                if j:
                    ids += sep
                ids += list(enc[i])[:self.max_caption_tokens]
                i += 1
            out.append(ids + tail)
        return out


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] left-padded with ``pad_id`` and their attention mask."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def left_pack(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's padded positions moved to its left, the real ones kept in order."""
    order = torch.argsort(mask, dim=1, stable=True)  # 0s (padding) first, then the 1s as they were
    packed = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    return packed, mask.gather(1, order)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate makes them from a mask: real tokens count from 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
