"""Finished shards of an unfinished run, kept where DVC does not reach them.

``persist`` in dvc.yaml stops ``dvc repro`` from deleting a stage's output folder
before it reruns the stage, but ``dvc exp run`` first checks out the outputs that
dvc.lock records (the last finished run's), which replaces the shards a killed
experiment had finished. So download and embed also link every shard they finish
into a sibling folder of their output (``data/images.partial/``,
``data/features.partial/``), under the shard's name and the digest of its
fingerprint (``00003@<digest>.tar``). A rerun that needs a shard with that
fingerprint links it back into the output folder; a run that finishes removes its
entries, so the folder holds work only while a run is unfinished.

Hard links cost no space while the output folder holds the same file; where they
are not possible (another file system), files are copied. Files are put in place
under a temporary name and renamed, in the order given (the finished mark last).
"""
from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

SEP = "@"
DIGEST_CHARS = 16


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s file (hard link, else a copy), atomically."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _left_by_a_dead_process(path: Path) -> bool:
    """``.NAME.PID.link`` whose process is gone (another rank's link in progress is not)."""
    try:
        os.kill(int(path.name.rsplit(".", 2)[-2]), 0)
    except (ValueError, IndexError):
        return False  # not one of ours
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


class PartialShards:
    """The ``<out>.partial`` folder of one output folder."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir).absolute()  # "." has no name to put ".partial" after
        self.root = self.out_dir.with_name(self.out_dir.name + ".partial")
        self._by_stem: Optional[dict[str, list[tuple[Path, str]]]] = None

    def sweep(self) -> None:
        """Remove the links a killed run left half made, here and in the output folder."""
        for folder in (self.root, self.out_dir):
            if folder.is_dir():
                for path in folder.glob(".*.link"):
                    if _left_by_a_dead_process(path):
                        path.unlink(missing_ok=True)

    def _entry(self, stem: str, digest: str, path: Path) -> Path:
        # The file's suffix after the stem (".tar", ".status.jsonl", ...) is kept.
        return self.root / f"{stem}{SEP}{digest[:DIGEST_CHARS]}{path.name[len(stem):]}"

    def save(self, stem: str, digest: str, files: Sequence[Path]) -> None:
        """Keep the files of finished shard ``stem`` (each named ``stem`` + suffix)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in files:
            _link(path, self._entry(stem, digest, path))

    def restore(self, stem: str, digest: str, files: Sequence[Path]) -> bool:
        """Put the kept shard ``stem`` with fingerprint ``digest`` back at ``files``, in
        that order; False (and nothing touched) when it is not kept whole."""
        entries = [self._entry(stem, digest, path) for path in files]
        if not all(e.is_file() for e in entries):
            return False
        for entry, path in zip(entries, files):
            _link(entry, path)
        return True

    def _entries(self) -> list[tuple[Path, str, str]]:
        """(path, stem, digest) of every kept file."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.iterdir():
            stem, sep, rest = path.name.rpartition(SEP)
            if sep and not path.name.startswith("."):
                out.append((path, stem, rest[:DIGEST_CHARS]))
        return out

    def keep_only(self, stem: str, digest: str) -> None:
        """Drop what is kept for shard ``stem`` under another fingerprint: of no use to this run."""
        if self._by_stem is None:  # one listing per run, not one per shard
            self._by_stem = defaultdict(list)
            for path, s, d in self._entries():
                self._by_stem[s].append((path, d))
        for path, d in self._by_stem.pop(stem, []):
            if d != digest[:DIGEST_CHARS]:
                path.unlink(missing_ok=True)

    def forget(self, stems: Iterable[str]) -> None:
        """Remove what is kept for ``stems`` (their run completed: DVC records them now)."""
        stems = set(stems)
        for path, stem, _ in self._entries():
            if stem in stems:
                path.unlink(missing_ok=True)

    def forget_others(self, stems: Iterable[str]) -> None:
        """Remove what is kept for shards other than ``stems`` (they no longer exist)."""
        stems = set(stems)
        for path, stem, _ in self._entries():
            if stem not in stems:
                path.unlink(missing_ok=True)

    def remove_if_empty(self) -> None:
        try:
            self.root.rmdir()
        except OSError:
            pass  # absent, or another rank still keeps shards in it
