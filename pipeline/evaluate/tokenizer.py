"""pycocoevalcap's PTB tokenization, safe to run concurrently and repeatedly.

pycocoevalcap's PTBTokenizer writes its input to a temporary file inside the
installed package (fails on a read-only install, litters it when killed) and
silently misaligns captions with images when a caption holds a line break other
than "\\n" (Java also splits lines at "\\r", U+2028, ...). This runs the same jar
with the same options on a private temporary file, maps every line terminator to
a space, and checks that one line came back per caption. Tokens are otherwise
identical to pycocoevalcap's.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as _ptb

from pipeline.evaluate.java import JavaToolError

JAR = Path(_ptb.__file__).resolve().parent / _ptb.STANFORD_CORENLP_3_4_1_JAR
PUNCTUATIONS = frozenset(_ptb.PUNCTUATIONS)
# Everything str.splitlines() breaks at; Java's readers break at several of these.
_LINE_BREAKS = {ord(c): " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def ptb_tokenize(sentences: list[str], java: str = "java") -> list[str]:
    """Tokenize each sentence as pycocoevalcap does (lower case, punctuation removed)."""
    if not sentences:
        return []
    text = "\n".join(s.translate(_LINE_BREAKS) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="capline-ptb-") as tmp:
        src = os.path.join(tmp, "sentences.txt")
        with open(src, "wb") as f:
            f.write(text.encode("utf-8"))
        proc = subprocess.run(
            [java, "-cp", str(JAR), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", src],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
        )
    if proc.returncode != 0:
        raise JavaToolError(
            f"PTB tokenizer (java, {JAR.name}) exited {proc.returncode}: "
            f"{proc.stderr.decode('utf-8', 'replace').strip()[-500:]}"
        )
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise JavaToolError(
            f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions"
        )
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
        for line in lines[: len(sentences)]
    ]
