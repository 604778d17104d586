"""Lets torchvision import beside a CPU-only torch when its compiled ops cannot load.

PyPI's Linux torchvision wheels are built against CUDA torch. Beside the CPU torch
(the CPU lock, or `pip install torch --index-url .../cpu`), their ``_C`` library fails
to load, and ``import torchvision`` then dies registering fake kernels for two ops it
never defined (``torchvision::nms``, ``qnms``). transformers imports torchvision when
it is installed, and open_clip needs its transforms, so that one failure would break
every model load. Defining the two schemas (never called: CLIP and GPT-2 use no
detection ops) lets the pure-Python parts import. Nothing happens on a torch with
CUDA, or where torchvision's ops load.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

_UNGUARDED_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: Optional[Any] = None  # kept alive: dropping a torch Library removes its definitions


def define_missing_ops() -> bool:
    """Define torchvision's two unguarded op schemas if its compiled ops cannot load.
    Returns whether it did."""
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or _library is not None:
        return False
    import torch

    if torch.version.cuda is not None:
        return False
    compiled = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C.*"))
    try:
        if compiled:
            torch.ops.load_library(str(compiled[0]))
            return False
    except (OSError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _UNGUARDED_OPS:
        _library.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs define_missing_ops once, just before the first ``import torchvision``,
    so processes that never import it pay nothing."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None  # the normal finders import it


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
