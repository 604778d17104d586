"""Taking keys out of a released state dict, so that none is silently ignored."""
from __future__ import annotations

import re
from typing import Iterable

import torch

from pipeline.imports.weights import ImportFailed

# Causal-mask buffers old transformers versions saved with GPT-2 (not weights).
GPT_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class Keys:
    """The checkpoint's tensors; ``take`` removes one, ``done`` fails on leftovers."""

    def __init__(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.left = dict(state)
        self.source = source
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.left

    def take(self, key: str) -> torch.Tensor:
        if key not in self.left:
            self.missing.append(key)
            return torch.empty(0)
        return self.left.pop(key)

    def take_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every key under ``prefix``, the prefix cut off."""
        taken = {k[len(prefix):]: v for k, v in self.left.items() if k.startswith(prefix)}
        for k in taken:
            del self.left[prefix + k]
        return taken

    def drop(self, keys: Iterable[str]) -> None:
        for k in list(keys):
            self.left.pop(k, None)

    def done(self) -> None:
        """Fail naming the keys the importer expected and did not find, and those it did not map."""
        problems = []
        if self.missing:
            problems.append(f"missing keys: {', '.join(sorted(self.missing))}")
        if self.left:
            problems.append(f"unexpected keys: {', '.join(sorted(self.left))}")
        if problems:
            raise ImportFailed(f"{self.source}: does not have the layout this importer maps ({'; '.join(problems)})")


def gpt_state(keys: Keys, prefix: str, gpt: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GPT-2's weights under ``prefix`` in the checkpoint, keyed as ``gpt``'s state dict;
    every key ``gpt`` has must be there, and none other (but the old mask buffers)."""
    found = keys.take_prefix(prefix)
    want = gpt.state_dict()
    state = {}
    for name, tensor in want.items():
        if name not in found:
            keys.missing.append(prefix + name)
            continue
        if found[name].shape != tensor.shape:
            raise ImportFailed(f"{keys.source}: {prefix}{name} has shape {tuple(found[name].shape)} but the "
                               f"--gpt model's is {tuple(tensor.shape)}; is --gpt the GPT-2 this checkpoint "
                               "was trained from?")
        state[name] = found.pop(name)
    for name in list(found):
        if GPT_MASK_BUFFER.match(name):
            del found[name]
    keys.left.update({prefix + k: v for k, v in found.items()})
    return state
