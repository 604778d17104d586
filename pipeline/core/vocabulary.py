"""The words the params schema, the runtime and the CLIs share, defined once.

* ``Precision`` / ``PRECISIONS``: the precision choices of every stage that runs a
  model and of ``capline caption``.
* ``NOT_APPLICABLE``: the decoding fields that apply to one decoding mode only,
  with the value that means "off" in the other modes (a saved generation config
  leaves them out there; the schema refuses any other value there).
* ``format_errors``: a pydantic ``ValidationError`` as one line per bad key, the
  key named the way the caller's user writes it (``generate.num_beams`` in
  params.yaml, ``--num-beams`` on the command line).

Plain Python with no pipeline or third-party import, so that torch-free and
pydantic-free code (the runtime, the GPU check) can import it.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

SAMPLING = "sampling"
BEAM_SEARCH = "beam search"
# field -> (its "off" value, the only mode it applies to)
NOT_APPLICABLE: dict[str, tuple[Any, str]] = {
    "temperature": (1.0, SAMPLING),
    "top_k": (0, SAMPLING),
    "top_p": (1.0, SAMPLING),
    "length_penalty": (1.0, BEAM_SEARCH),
}


def format_errors(err: Any, model: Any, name: Callable[[str], str] = lambda key: key) -> str:
    """The errors of ``err`` (a pydantic ValidationError of ``model``) as ``key: message; ...``.

    ``name`` turns a dotted key of ``model`` (``generate.num_beams``) into the name the
    user knows it by; a section validator's message that starts with a key
    (``"num_beams: ..."``) is reported under that key, and the other keys of that
    section it mentions are named in full too.
    """
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            first = msg.split(" ")[0]
            if ":" in first:
                loc.append(msg.split(":", 1)[0])
                msg = _name_fields(msg.split(":", 1)[1].strip(), model, loc[:-1], name)
        if isinstance(e.get("input"), (str, int, float, bool)) and e["type"] != "extra_forbidden":
            msg += f" (got {e['input']!r})"
        key = ".".join(loc)
        lines.append(f"{name(key) if key else '<root>'}: {msg}")
    return "; ".join(lines)


def _name_fields(msg: str, model: Any, loc: list[str], name: Callable[[str], str]) -> str:
    """``msg`` with the field names of the section at ``loc`` written as ``name(full key)``."""
    section = model
    for part in loc:
        field = getattr(section, "model_fields", {}).get(part)
        section = field.annotation if field is not None else None
    fields = getattr(section, "model_fields", None)
    if not fields:
        return msg
    prefix = "".join(f"{part}." for part in loc)
    pattern = "|".join(sorted(fields, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({pattern})(?![\w])", lambda m: name(prefix + m.group(1)), msg)
