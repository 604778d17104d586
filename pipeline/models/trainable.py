"""Which parts of GPT-2 train: ``train.finetune_gpt_layers``.

The seed (clip-gpt-captioning) freezes GPT-2 except ``list(parameters())[14:-14]``'s
complement, i.e. the token and position embeddings, the first and last blocks and the
final LayerNorm: ``["wte", "wpe", 0, -1, "ln_f"]`` here. Block indices count like
Python's (negative from the end) so one list fits GPT-2 small and medium.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from pipeline.core.errors import ParamsError

KEY = "train.finetune_gpt_layers"
NAMED = ("wte", "wpe", "ln_f")


def finetune_gpt_parts(gpt: nn.Module, parts: Sequence[Union[int, str]]) -> None:
    """Freeze all of ``gpt`` (a GPT2LMHeadModel) but ``parts``; a block index GPT-2 does not
    have is a ParamsError naming the key. The LM head is tied to ``wte``, so it trains with it."""
    body = gpt.transformer
    depth = len(body.h)
    chosen: list[nn.Module] = []
    for part in parts:
        if isinstance(part, str):
            if part not in NAMED:
                raise ParamsError(f"{KEY}: {part!r} is not a block index or one of {', '.join(NAMED)}")
            chosen.append(getattr(body, part))
        elif -depth <= part < depth:
            chosen.append(body.h[part])
        else:
            raise ParamsError(f"{KEY}: block {part} does not exist; GPT-2 has {depth} blocks "
                              f"(0..{depth - 1}, or -{depth}..-1)")
    gpt.requires_grad_(False)
    for module in chosen:
        module.requires_grad_(True)
