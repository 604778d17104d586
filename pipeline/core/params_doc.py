"""The parameter reference (docs/params.md), generated from the schema.

Defaults, types, bounds and meanings all come from ``pipeline/core/params.py`` (each
field's ``description``), and the stages that read each key from dvc.yaml, so the
reference cannot drift from the code: ``capline params doc > docs/params.md``
rewrites it, and a test checks that the committed file is current.
"""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel

from pipeline.core.params import Params

INTRO = """# Parameters (`params.yaml`)

Generated from the schema in `pipeline/core/params.py` by `capline params doc`; do not edit
by hand. Every key is typed and validated when a stage starts: an unknown key, a wrong
type or an impossible value stops the run before any work, with a message naming the
key:

```
$ dvc exp run -S mapper.layers=0
ERROR: params.yaml: invalid params: mapper.layers: Input should be greater than or equal to 1 (got 0)
```

The defaults below are the values of the committed `params.yaml` (the offline demo);
the two are kept equal by a test. Each stage in `dvc.yaml` lists exactly the params it
reads (the "stages" column), so a change reruns those stages and what follows them,
nothing before. Recipes for real data and models are override files in `configs/`
(see [recipes.md](recipes.md)).
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" or `null`" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
                           ("pattern", "matches")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}" if attr != "pattern" else f"matches `{value}`")
    return ", ".join(parts)


def _default(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return f"`{json.dumps(value)}`"  # one table row: newlines written as \n
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("...").strip()
    return f"`{text}`".replace("|", "\\|")


def _readers(dvc: dict) -> dict[str, list[str]]:
    """params key (or section) -> the stages that list it."""
    out: dict[str, list[str]] = {}
    for stage, spec in dvc.get("stages", {}).items():
        for entry in spec.get("params", []):
            keys = entry if isinstance(entry, str) else None
            if keys is None:
                continue
            out.setdefault(keys, []).append(stage)
    return out


def _stages_for(key: str, readers: dict[str, list[str]]) -> str:
    found: list[str] = []
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        found += readers.get(".".join(parts[:i]), [])
    # A stage listing a deeper key than this one reads part of it (a sub-section).
    found += [s for k, stages in readers.items() if k.startswith(key + ".") for s in stages]
    return ", ".join(dict.fromkeys(found)) or "—"


def _rows(model: type[BaseModel], prefix: str, readers: dict[str, list[str]]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, key, readers)
            continue
        meaning = (field.description or "").replace("|", "\\|")
        bounds = _bounds(field)
        kind = _type_name(annotation) + (f" ({bounds})" if bounds else "")
        default = _default(field.get_default(call_default_factory=True))
        rows.append(f"| `{key}` | {default} | {kind} | {meaning} | {_stages_for(key, readers)} |")
    return rows


def markdown(dvc_yaml: Optional[Path] = None) -> str:
    """The whole reference: one table per section of params.yaml."""
    dvc = yaml.safe_load(Path(dvc_yaml).read_text()) if dvc_yaml and Path(dvc_yaml).exists() else {}
    readers = _readers(dvc or {})
    out = [INTRO]
    for name, field in Params.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            rows = _rows_for_scalar(name, field, readers)
            out.append(f"## `{name}`\n\n{field.description or ''}\n\n" + _table(rows))
            continue
        doc = " ".join((section.__doc__ or "").split())
        out.append(f"## `{name}`\n\n{doc}\n\n" + _table(_rows(section, name, readers)))
    return "\n".join(out)


def _rows_for_scalar(name: str, field: Any, readers: dict[str, list[str]]) -> list[str]:
    bounds = _bounds(field)
    kind = _type_name(field.annotation) + (f" ({bounds})" if bounds else "")
    default = _default(field.get_default(call_default_factory=True))
    return [f"| `{name}` | {default} | {kind} | {(field.description or '')} | {_stages_for(name, readers)} |"]


def _table(rows: list[str]) -> str:
    return "| key | default | type | meaning | stages |\n| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(Path("dvc.yaml")), end="")
