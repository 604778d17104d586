"""The one base class of expected failures.

An expected failure is the user's to fix: a bad param, a bad or missing input file,
a model that cannot be loaded, a missing tool. Every such error derives from
``CaplineError`` and carries a message that names the param, the file (and line or
record) or the model. ``stages/cli.py`` turns it into a one-line CLI error in one
place; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class CaplineError(Exception):
    """An expected failure whose message tells the user what to fix."""


class ParamsError(CaplineError):
    """An invalid parameter; the message names the key (``mapper.layers: ...``)."""


class ModelError(CaplineError):
    """A model could not be pinned or loaded; the message names the model or folder."""
