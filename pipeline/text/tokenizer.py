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
import re
import subprocess
import tempfile
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as _ptb

from pipeline.text.java import JavaToolError

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


# ------------------------------------------------------------ in-process twin
# Self-critical training scores hundreds of sampled captions per step; a Java call
# per step would cost more than the step. ``fast_ptb_tokenize`` follows the PTB
# tokenizer's rules for what captioners write (lower case; punctuation split off and
# dropped; contractions and possessives split; abbreviations keep their period) and
# is tested equal to the Java tokenizer on every demo caption and on COCO-style
# captions with quotes, brackets, numbers, contractions and markup. References are
# still tokenized by Java, once. Known differences are rarities such as
# "rock'n'roll", "'tis" or emoji (which Java drops).
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr prof etc vs no co inc ltd corp mt ft ave".split())
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_REWRITES = {"can't": "ca n't", "won't": "wo n't", "shan't": "sha n't", "ain't": "ai n't",
             "cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_REWRITE = re.compile(r"\b(" + "|".join(re.escape(w) for w in _REWRITES) + r")\b")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_KEEP = frozenset(["n't", "'s", "'re", "'ve", "'ll", "'d", "'m", *_BRACKETS.values()])
_TOKEN = re.compile(
    r"""</?\w+>                     # markup tags stay whole: <b>
      | [@#][^\W\d]\w*              # @name and #tag (but "#1" is two tokens)
      | \d+(?:[,:]\d+)+(?:\.\d+)?  # 1,000 and 10:30
      | \w+(?:[-'/.]\w+)*\.?        # words: t-shirt, o'clock, and/or, u.s.a, 3.5; maybe a final period
      | [!?]+|\.+|-+                # runs of ! ? . - are one token
      | [^\w\s]                     # any other symbol on its own
    """,
    re.VERBOSE,
)


def _final_period(token: str) -> list[str]:
    """A word ending in a period keeps it only as an abbreviation (a.m., mr., a single letter)."""
    stem = token[:-1]
    if (len(stem) == 1 and stem.isalpha()) or stem in _ABBREVIATIONS \
            or ("." in stem and not stem.replace(".", "").isdigit()):
        return [token]
    return [stem, "."]


def fast_ptb_tokenize(text: str) -> str:
    """One caption tokenized as ``ptb_tokenize`` would, without Java (see above)."""
    text = text.translate(_LINE_BREAKS).lower().replace("&amp;", "&")
    text = text.replace("\u2014", " -- ").replace("\u2013", " -- ")  # em and en dashes
    text = _REWRITE.sub(lambda m: _REWRITES[m.group(1)], text)
    text = _CLITIC.sub(r" \1", text)
    text = "".join(f" {_BRACKETS[c]} " if c in _BRACKETS else (" " if c in "\"`" else c) for c in text)
    out: list[str] = []
    for chunk in text.split():
        if chunk in _KEEP:
            out.append(chunk)
            continue
        for tok in _TOKEN.findall(chunk.strip("'")):  # single quotes around a word are quote marks
            out.extend(_final_period(tok) if tok[0].isalnum() and len(tok) > 1 and tok.endswith(".") else [tok])
    return " ".join(t for t in out if t not in PUNCTUATIONS and not set(t) <= {"."})
