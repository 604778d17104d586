"""Recipes: override files in ``configs/`` that hold only the keys they change.

A recipe (``configs/clipcap-coco-transformer.yaml``) is a partial params file: the
keys it lists replace those of ``params.yaml``, everything else stays. ``apply``
merges one or more recipes into a params file and validates the merged result
exactly as every stage does (``parse_params``), then rewrites the params file in
place: only the values of the changed keys are edited, so its comments and layout
survive and ``git diff`` / ``dvc params diff`` show exactly what the recipe changed.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from pipeline.core.params import Params, ParamsError, parse_params

__all__ = ["Change", "apply_recipes", "flatten", "load_recipe", "merge", "merged_params", "own_keys", "rewrite_values"]

EXTENDS = "extends"  # a recipe's optional base recipe, applied first
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_yaml(path: Path, what: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ParamsError(f"{what} not found: {path}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of params sections")
    return raw


def load_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A recipe's overrides, with those of the recipe it ``extends`` (a file name beside
    it) underneath; every key must be one the params schema knows."""
    path = Path(path)
    raw = _read_yaml(path, "recipe")
    base: dict = {}
    if EXTENDS in raw:
        parent = raw.pop(EXTENDS)
        if not isinstance(parent, str) or not parent:
            raise ParamsError(f"{path}: {EXTENDS}: must name a recipe file beside it")
        parent_path = path.parent / parent
        if parent_path.resolve() in _seen or parent_path.resolve() == path.resolve():
            raise ParamsError(f"{path}: {EXTENDS}: {parent} extends itself (a cycle)")
        base = load_recipe(parent_path, _seen + (path.resolve(),))
    known = flatten(Params().model_dump())
    sections = {k.split(".")[0] for k in known} | set(known)
    for key, value in flatten(raw).items():
        if key not in known and not (isinstance(value, dict) and key in sections):
            raise ParamsError(f"{path}: {key}: unknown key")
    return merge(base, raw)


def own_keys(path: str | Path) -> dict[str, Any]:
    """The dotted keys a recipe file sets itself (not through ``extends``)."""
    raw = _read_yaml(Path(path), "recipe")
    raw.pop(EXTENDS, None)
    return flatten(raw)


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s leaves put in (a new dict; inputs untouched)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merged_params(params_path: str | Path, recipes: Iterable[str | Path]) -> tuple[dict, Params, list[Change]]:
    """(merged mapping, validated Params, changed keys) of params_path + recipes in order."""
    params_path = Path(params_path)
    base = _read_yaml(params_path, "params file")
    merged = base
    names = []
    for recipe in recipes:
        merged = merge(merged, load_recipe(recipe))
        names.append(str(recipe))
    try:
        params = parse_params(merged)
    except ParamsError as err:
        raise ParamsError(f"{params_path} + {' + '.join(names)}: {err}") from None
    old, new = flatten(base), flatten(merged)
    changes = [Change(k, old.get(k), new[k]) for k in new if old.get(k, object()) != new[k]]
    return merged, params, changes


def apply_recipes(params_path: str | Path, recipes: Iterable[str | Path], write: bool = True) -> list[Change]:
    """Merge ``recipes`` into ``params_path`` (validated), rewrite it in place; return the changes."""
    from pipeline.core.files import write_atomic

    params_path = Path(params_path)
    recipes = list(recipes)
    merged, _, changes = merged_params(params_path, recipes)
    if write and changes:
        text = params_path.read_text()
        seen: dict[str, Any] = {}
        for recipe in recipes:  # each changed line names the recipe that set it last
            for key in flatten(load_recipe(recipe)):
                seen[key] = str(recipe)
        for c in changes:
            text = rewrite_values(text, {c.key: c.new}, note=seen.get(c.key))
        if yaml.safe_load(text) != merged:  # never write a file that means something else
            raise ParamsError(f"{params_path}: could not rewrite the values in place; merge by hand")
        write_atomic(params_path, text)
    return changes


# ------------------------------------------------------------ in-place rewriting
def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _split_comment(rest: str) -> tuple[str, str]:
    """``' 0.001   # why'`` -> (``' 0.001'``, ``'   # why'``); quotes are respected."""
    quote: Optional[str] = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            j = i
            while j > 0 and rest[j - 1] in " \t":
                j -= 1
            return rest[:j], rest[j:]
    return rest.rstrip(), ""


def _index(lines: list[str]) -> dict[str, tuple[int, int, int]]:
    """dotted key -> (line, indent, last line of its block) for every mapping key."""
    found: dict[str, tuple[int, int, int]] = {}
    stack: list[tuple[int, str]] = []
    for n, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        key = ".".join(k for _, k in stack)
        found[key] = (n, indent, n)
        for depth in range(1, len(stack)):  # this line lies inside every enclosing block
            parent = ".".join(k for _, k in stack[:depth])
            line_no, ind, _ = found[parent]
            found[parent] = (line_no, ind, n)
    return found


def rewrite_values(text: str, values: dict[str, Any], note: Optional[str] = None) -> str:
    """``text`` (a block-style YAML mapping) with the dotted keys' values replaced.

    Existing keys keep their line, indentation and comment column; the comment
    becomes ``# note`` when given (the old one may describe the old value). A
    missing key is added at the end of its section. Keys are applied one at a time
    so that a new section's lines are found by the next key.
    """
    lines = text.splitlines()
    for key, value in values.items():
        found = _index(lines)
        if key in found:
            n, indent, _ = found[key]
            m = _KEY_LINE.match(lines[n])
            _, comment = _split_comment(m["rest"])
            new = f"{' ' * indent}{m['key']}: {_scalar(value)}"
            if note:
                comment = comment[:len(comment) - len(comment.lstrip(" \t"))] + f"# {note}" if comment else f"  # {note}"
            if comment:
                comment = comment.lstrip(" \t")
                column = len(lines[n]) - len(comment)  # keep the comment where it was if the value fits
                new = new.ljust(column) if len(new) < column else new + "  "
                new += comment
            lines[n] = new
            continue
        parts = key.split(".")
        # the deepest section that exists; the rest is added as a nested block
        depth = max((d for d in range(1, len(parts)) if ".".join(parts[:d]) in found), default=0)
        nested: Any = value
        for part in reversed(parts[depth:]):
            nested = {part: nested}
        if depth:
            _, indent, last = found[".".join(parts[:depth])]
            child_indent = indent + 2
            block = yaml.safe_dump(nested, default_flow_style=False, sort_keys=False, width=10_000)
            lines[last + 1:last + 1] = [" " * child_indent + b for b in block.splitlines()]
        else:
            block = yaml.safe_dump(nested, default_flow_style=False, sort_keys=False, width=10_000)
            lines += [""] + block.splitlines()
    return "\n".join(lines) + "\n"
