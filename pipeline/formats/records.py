"""Dataset records: the contract between a dataset spec and the download stage.

One record per image: a stable ``key`` (a pure function of the input), the image
``url``, its ``split`` (chosen per image, never per caption) and all of its
reference captions.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Optional

SPLITS = ("train", "val", "test")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class Record:
    key: str
    url: str
    split: str
    captions: tuple[str, ...]
    sha256: Optional[str] = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not _KEY_RE.match(self.key):
            # Keys become tar member names; webdataset splits a name at its first dot.
            raise ValueError(f"record key {self.key!r}: only letters, digits, '_' and '-' are allowed")
        if self.split not in SPLITS:
            raise ValueError(f"record {self.key}: split {self.split!r} is not one of {SPLITS}")


def split_for(identity: str, val_fraction: float, test_fraction: float) -> str:
    """Assign a split from a hash of the image's identity (its key or URL).

    Deterministic and independent of input order, so an image keeps its split
    when the list grows, and all captions of one image share it.
    """
    h = int.from_bytes(hashlib.sha256(identity.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"
