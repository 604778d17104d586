"""``clip.patch_tokens`` resolved: whether embed stores patch tokens.

``auto`` means "when ``mapper.type`` reads them". Embed itself does not list
``mapper.type`` among its DVC params (switching between prefix mappers would then
rerun it); the ``embed_plan`` stage reads both params and writes the answer to a small
file that embed depends on, so DVC reruns embed only when the answer changes.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import ParamsError
from pipeline.core.files import write_atomic
from pipeline.core.params import Params
from pipeline.models.mapper import mapper_class


def patch_tokens_wanted(params: Params) -> bool:
    """``clip.patch_tokens`` as a bool: ``auto`` follows what ``mapper.type`` reads."""
    setting = params.clip.patch_tokens
    if setting == "auto":
        return bool(mapper_class(params.mapper.type).patch_tokens)
    return setting == "true"


def write_plan(params: Params, out: Path) -> dict:
    """The plan file: ``{"patch_tokens": bool}``, unchanged bytes while the answer is."""
    plan = {"patch_tokens": patch_tokens_wanted(params)}
    write_atomic(out, json.dumps(plan, sort_keys=True) + "\n")
    return plan


def read_plan(path: Path) -> bool:
    """The plan's ``patch_tokens``; a ParamsError naming the file when it is not one."""
    try:
        plan = json.loads(Path(path).read_text())
        return bool(plan["patch_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ParamsError(f"{path}: not an embed plan ({type(err).__name__}: {err}); `capline embed-plan` "
                          "writes one") from None
