"""Encoded caption vectors of an unfinished datastore build, kept so a rerun resumes.

The captions are encoded in chunks of whole batches; each finished chunk is saved as
``<out>.partial/NNNNN@<digest>.npy``, where the digest covers everything that
changes the vectors (the captions, the CLIP, the batch size, the code, the
libraries). A rerun loads the chunks of its own digest and encodes only the rest;
chunks of another digest are never read and go with the folder once the datastore
is written. Under several ranks, chunk i is encoded by rank ``i % world_size``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

DIGEST_CHARS = 16


class EncodedChunks:
    def __init__(self, out_dir: Path, digest: str) -> None:
        out_dir = Path(out_dir).absolute()
        self.root = out_dir.with_name(out_dir.name + ".partial")
        self.digest = digest[:DIGEST_CHARS]

    def path(self, i: int) -> Path:
        return self.root / f"{i:05d}@{self.digest}.npy"

    def done(self, i: int) -> bool:
        return self.path(i).is_file()

    def save(self, i: int, vectors: np.ndarray) -> None:
        """Written under a temporary name and renamed: a chunk on disk is whole."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(i)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
        os.replace(tmp, final)

    def load(self, i: int) -> np.ndarray:
        return np.load(self.path(i))

    def missing(self, count: int) -> list[int]:
        return [i for i in range(count) if not self.done(i)]

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
