"""METEOR 1.5 through pycocoevalcap's jar, as a context manager that always closes it.

pycocoevalcap's Meteor leaves its Java process to ``__del__`` and pipes its stderr
without reading it (a chatty run can fill the pipe and hang). This speaks the same
protocol to the same jar with the same options, so scores are identical, and stops
the process on exit. One instance can score several caption sets (model, control,
baseline): the 2 GB paraphrase table is loaded once.
"""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Hashable, Mapping

import pycocoevalcap.meteor.meteor as _meteor

from pipeline.text.java import JavaToolError

JAR = Path(_meteor.__file__).resolve().parent / _meteor.METEOR_JAR


class Meteor:
    def __init__(self, java: str = "java") -> None:
        self._proc = subprocess.Popen(
            [java, "-jar", "-Xmx2G", str(JAR), "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=str(JAR.parent),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._lock = threading.Lock()

    def __enter__(self) -> "Meteor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the Java process (idempotent)."""
        with self._lock:
            if self._proc.poll() is None:
                try:
                    self._proc.stdin.close()
                    self._proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self._proc.kill()
                    self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()

    def _line(self, text: str) -> str:
        self._proc.stdin.write((text + "\n").encode("utf-8"))
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise JavaToolError(f"METEOR (java, {JAR.name}) stopped (exit code {self._proc.poll()})")
        return line.decode("utf-8").strip()

    def compute_score(
        self, gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]]
    ) -> tuple[float, list[float]]:
        """Same as pycocoevalcap's Meteor.compute_score: (corpus score, per-image scores)."""
        assert gts.keys() == res.keys()
        with self._lock:
            eval_line = "EVAL"
            for i in gts:
                hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
                # A "|||" inside a reference would break the protocol's fields.
                refs = [r.replace("|||", "") for r in gts[i]]
                stat = self._line(" ||| ".join(("SCORE", " ||| ".join(refs), hypothesis)))
                eval_line += f" ||| {stat}"
            self._proc.stdin.write((eval_line + "\n").encode("utf-8"))
            self._proc.stdin.flush()
            scores = [float(self._proc.stdout.readline().strip()) for _ in gts]
            score = float(self._proc.stdout.readline().strip())
        return score, scores
