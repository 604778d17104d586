"""SPICE, when its Stanford CoreNLP 3.6.0 jars are present; otherwise a reason why not.

pycocoevalcap's Spice downloads CoreNLP on first use and writes temporary and cache
files inside the installed package. Here the jars come from `evaluate.corenlp_dir`
(or the package's spice/lib, where pycocoevalcap's downloader puts them), files go
to a private temporary folder, and any failure becomes a reason, never a crash.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Hashable, Mapping, Optional

import pycocoevalcap.spice as _spice_pkg

SPICE_DIR = Path(_spice_pkg.__file__).resolve().parent
SPICE_JAR = SPICE_DIR / "spice-1.0.jar"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def find_corenlp(corenlp_dir: Optional[str]) -> tuple[Optional[Path], str]:
    """Return (folder holding both CoreNLP jars, "") or (None, the reason SPICE is skipped)."""
    if corenlp_dir:
        folder = Path(corenlp_dir)
        missing = [j for j in CORENLP_JARS if not (folder / j).is_file()]
        if not missing:
            return folder, ""
        return None, (
            f"evaluate.corenlp_dir {corenlp_dir}: missing {', '.join(missing)} "
            "(from stanford-corenlp-full-2015-12-09.zip)"
        )
    lib = SPICE_DIR / "lib"
    if all((lib / j).is_file() for j in CORENLP_JARS):
        return lib, ""
    return None, (
        "evaluate.corenlp_dir is not set and pycocoevalcap's spice/lib has no "
        f"{CORENLP_JARS[0]}; put the Stanford CoreNLP 3.6.0 jars in a folder and name it there"
    )


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def compute_spice(
    gts: Mapping[Hashable, list[str]],
    res: Mapping[Hashable, list[str]],
    corenlp: Path,
    java: str = "java",
) -> tuple[float, dict[Hashable, float]]:
    """SPICE F-score for the corpus (mean over images) and per image, as pycocoevalcap computes it."""
    ids = list(gts)
    # SPICE echoes image ids back through JSON; index by position to keep int/str ids intact.
    data = [{"image_id": n, "test": res[i][0], "refs": gts[i]} for n, i in enumerate(ids)]
    classpath = os.pathsep.join([str(SPICE_JAR), str(SPICE_DIR / "lib" / "*"), str(corenlp / "*")])
    with tempfile.TemporaryDirectory(prefix="capline-spice-") as tmp:
        src, out = Path(tmp, "in.json"), Path(tmp, "out.json")
        src.write_text(json.dumps(data), encoding="utf-8")
        proc = subprocess.run(
            [java, "-Xmx8G", "-cp", classpath, "edu.anu.spice.SpiceScorer", str(src),
             "-out", str(out), "-subset", "-silent"],
            cwd=str(SPICE_DIR), stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
        )
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.decode("utf-8", "replace").strip()[-300:]
            raise RuntimeError(f"SPICE exited {proc.returncode}: {tail}")
        results = json.loads(out.read_text(encoding="utf-8"))
    per_image = {ids[item["image_id"]]: _float(item["scores"]["All"]["f"]) for item in results}
    values = [per_image[i] for i in ids]
    return float(sum(values) / len(values)), per_image
