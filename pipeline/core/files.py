"""Whole-or-nothing outputs: files and folders written under a temporary name and
renamed when complete, so a kill never leaves a half-written output under its
real name.

Every stage writes its small outputs through here: metrics (one format for all
stages), JSON and JSON-lines files, CSV curves, and finished folders (models,
prepared sources) that replace the previous ones only once whole.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

# Beside a captions folder's results.json: what made them (retrieval_k, the datastore), for evaluate.
CAPTIONED_WITH_FILE = "captioned_with.json"
# The figures of the transfer stage's summary (transfer.json) that evaluate copies into eval.json.
TRANSFER_FIELDS = ("transfer_cider", "transfer_cider_source_datastore", "transfer_ratio")


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any, **dumps_options: Any) -> None:
    """``obj`` as JSON (``json.dumps`` with the given options) and a newline."""
    write_atomic(path, json.dumps(obj, **dumps_options) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8 kept as is), e.g. status and per-image files."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_csv(path: str | Path, fields: tuple[str, ...], rows: Iterable[Mapping[str, Any]]) -> None:
    """A curve as CSV (x first) for `dvc plots show`, written whole: floats to 6
    significant digits, a missing or None value as an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in fields})
    write_atomic(path, buf.getvalue())


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: a float that is not a number becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_timing(key: str) -> bool:
    """Wall times and rates: they differ from run to run of the same inputs."""
    return "seconds" in key or key.endswith("_per_s")


def timings_path(path: str | Path) -> Path:
    """Where the timings of the metrics file ``path`` go: ``timings/`` beside it."""
    path = Path(path)
    return path.parent / "timings" / path.name


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> None:
    """A stage's metrics for ``dvc metrics show``: flat JSON, one format for every stage.

    What the inputs decide goes to ``path``, a stage output whose hash dvc.lock records;
    wall times and rates go to ``timings_path(path)``, which dvc.yaml lists as
    metrics outside every stage, so the same inputs give the same dvc.lock.
    """
    clean = {k: finite_or_none(v) for k, v in metrics.items()}
    write_json(path, {k: v for k, v in clean.items() if not is_timing(k)}, indent=2, ensure_ascii=False,
               allow_nan=False)
    timings = {k: v for k, v in clean.items() if is_timing(k)}
    if timings:
        timings_path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(timings_path(path), timings, indent=2, ensure_ascii=False, allow_nan=False)


def read_metrics(path: str | Path) -> dict:
    """A metrics file with its timings merged back in (what ``write_metrics`` split)."""
    metrics = json.loads(Path(path).read_text())
    if timings_path(path).is_file():
        metrics.update(json.loads(timings_path(path).read_text()))
    return metrics


def temp_dir_for(final: str | Path) -> Path:
    """A fresh, empty temporary folder beside ``final`` (same file system, so it can be renamed).

    Leftovers of a killed earlier run for the same output were never whole: they go.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def remove_temporaries(final: str | Path) -> None:
    """Delete what a killed writer of ``final`` left behind (files or folders)."""
    final = Path(final)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def written_whole(final: str | Path) -> Iterator[Path]:
    """``with written_whole(out) as tmp:`` fill ``tmp``; when the block ends, ``tmp`` takes
    ``out``'s place (``replace_dir``). On any exception, or a kill, ``out`` stays as it
    was and ``tmp`` goes (a killed run's leftover goes with the next ``temp_dir_for``)."""
    tmp = temp_dir_for(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Put the finished folder ``tmp`` in place of ``final``; the old one goes only after."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
