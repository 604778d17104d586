"""Training checkpoints: whole-or-nothing folders of safetensors + JSON, never pickle.

A checkpoint is a folder ``<root>/<prefix>-<step:09d>/`` with two files:

* ``tensors.safetensors``: every tensor: modules' state (``module/<name>/<key>``) and
  the tensors inside stateful objects' ``state_dict()`` (optimizer moments, ...,
  ``state/<name>/<path>``);
* ``checkpoint.json``: the step, the run's identity and its digest, the caller's
  ``state`` (JSON: epoch, position, losses, ...), the RNG states, and the
  non-tensor rest of each stateful object's ``state_dict()`` (param groups,
  schedule counters, scaler scale), with tensors replaced by references.

A ``state_dict()`` tree is stored as JSON with tags for what JSON lacks (tuples,
integer dict keys, non-finite floats, numpy arrays, tensors), so an optimizer,
an LR schedule and a ``GradScaler`` round-trip exactly, with no pickle.

The **identity** is a JSON mapping of what must be equal for a checkpoint to be
resumed (params, the digest of the input files, the GPT-2 digest, the world size,
...). A checkpoint whose identity differs is never loaded: ``Checkpoints.latest``
skips it with a log line that names the differing entries.

A checkpoint is written under a temporary name and renamed when whole, so a kill
at any moment leaves the previous checkpoints intact; only the newest ``keep``
checkpoints of a prefix are kept.

Typical use (see ``pipeline/train/run.py``)::

    ckpts = Checkpoints("data/checkpoints/train", identity={"params": ..., "features": digest_files(...)})
    found = ckpts.latest()                       # None, or the newest resumable one
    if found is not None:
        state = found.restore(modules={"mapper": mapper}, stateful={"optimizer": opt, "schedule": sched})
        restore_rng(found.rng[0])
    ...
    ckpts.save(step, modules={"mapper": mapper}, stateful={"optimizer": opt, "schedule": sched},
               state={"epoch": e, "position": b}, rng=[capture_rng()])
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from pipeline.core.errors import CaplineError
from pipeline.core.files import replace_dir, temp_dir_for

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_NAME = "checkpoint.json"
TENSORS_NAME = "tensors.safetensors"

__all__ = [
    "Checkpoint", "CheckpointError", "Checkpoints", "capture_rng", "describe_difference", "digest_files",
    "identity_digest", "load_checkpoint", "restore_rng", "save_checkpoint",
]


class CheckpointError(CaplineError):
    """A checkpoint folder that cannot be read or does not fit what it is loaded into."""


# ------------------------------------------------------------------- identity
def identity_digest(identity: Mapping[str, Any]) -> str:
    """sha256 of the identity as canonical JSON (sorted keys)."""
    text = json.dumps(_plain(identity), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest_files(path: str | Path) -> str:
    """sha256 over a file, or over a folder's files (relative names and contents, in name order).

    Dot-files and folders (temporaries, caches) are skipped. This reads every byte:
    about 1-2 s per GB.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
        base = path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        base = path
    else:
        raise CheckpointError(f"{path}: not found, cannot compute its digest")
    for f in files:
        h.update(str(f.relative_to(base)).encode("utf-8") + b"\0")
        part = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                part.update(block)
        h.update(part.digest())
    return h.hexdigest()


def describe_difference(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4) -> str:
    """Which identity entries differ, as ``key: saved there, current here`` (nested keys dotted)."""
    from pipeline.core import fingerprint

    return fingerprint.describe_difference(_plain(saved), _plain(current), limit,
                                           nothing="the identity digest differs")


def _plain(obj: Any) -> Any:
    """JSON-able copy of an identity (tuples as lists, numpy scalars as Python)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# -------------------------------------------------------------- RNG states
def capture_rng() -> dict:
    """Every RNG state of this process: Python, numpy's global one, torch CPU, and CUDA
    (every device, when CUDA has been initialised)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back what ``capture_rng`` took (CUDA only where both have CUDA states)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint has CUDA RNG states of %d devices, this machine has %d; "
                        "CUDA RNG states not restored", len(cuda), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ------------------------------------------------------- state trees as JSON
def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` as JSON, tensors moved into ``tensors`` under ``path``-derived names."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        # A private copy: safetensors refuses tensors that share memory (tied weights).
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return encode_tree(obj.item(), tensors, path)
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__dict__": [[encode_tree(k, tensors, f"{path}/key{i}"), encode_tree(v, tensors, f"{path}/{k}")]
                             for i, (k, v) in enumerate(obj.items())]}
    raise CheckpointError(f"checkpoint: cannot store {type(obj).__name__} at {path!r} without pickle")


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_tree``."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"checkpoint: tensor {key!r} is missing from {TENSORS_NAME}")
        return tensors[key]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


# ------------------------------------------------------------ one checkpoint
def save_checkpoint(
    folder: str | Path,
    *,
    step: int,
    identity: Mapping[str, Any],
    modules: Mapping[str, torch.nn.Module] = {},
    stateful: Mapping[str, Any] = {},
    state: Mapping[str, Any] = {},
    rng: Optional[list[Mapping[str, Any]]] = None,
) -> Path:
    """Write one checkpoint folder whole (temporary name, fsync, rename).

    ``modules``: their ``state_dict()`` tensors. ``stateful``: objects with
    ``state_dict()``/``load_state_dict()`` (optimizer, LR schedule, GradScaler).
    ``state``: the caller's JSON-able values. ``rng``: RNG states (``capture_rng``),
    one per process, in rank order.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module/{name}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "digest": identity_digest(identity),
        "identity": _plain(identity),
        "modules": sorted(modules),
        "stateful": {name: encode_tree(obj.state_dict(), tensors, f"state/{name}") for name, obj in stateful.items()},
        "state": encode_tree(dict(state), tensors, "user"),
        "rng": encode_tree(list(rng) if rng is not None else None, tensors, "rng"),
    }
    text = json.dumps(meta, indent=1, allow_nan=False) + "\n"
    tmp = temp_dir_for(folder)
    try:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(text)
        for name in (TENSORS_NAME, META_NAME):
            _fsync(tmp / name)
        replace_dir(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems refuse fsync on folders
        pass


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its metadata now, its tensors when restored."""

    path: Path
    step: int
    digest: str
    identity: dict
    meta: dict = field(repr=False)

    @property
    def state(self) -> dict:
        """The caller's ``state`` (tensors in it are loaded on demand)."""
        return decode_tree(self.meta["state"], _LazyTensors(self.path))

    @property
    def rng(self) -> Optional[list[dict]]:
        return decode_tree(self.meta["rng"], _LazyTensors(self.path))

    def restore(self, modules: Mapping[str, torch.nn.Module] = {}, stateful: Mapping[str, Any] = {}) -> dict:
        """Load the weights into ``modules`` (strict) and the states into ``stateful``;
        returns the caller's ``state``. Names must be those the checkpoint was saved with."""
        from safetensors.torch import load_file

        missing = sorted(set(modules) - set(self.meta["modules"])) + \
            sorted(set(stateful) - set(self.meta["stateful"]))
        if missing:
            raise CheckpointError(f"{self.path}: holds no state for {', '.join(missing)}")
        try:
            tensors = load_file(str(self.path / TENSORS_NAME))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path / TENSORS_NAME}: unreadable ({err})") from None
        for name, module in modules.items():
            prefix = f"module/{name}/"
            weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(weights, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"{self.path}: weights of {name!r} do not fit the model ({err})") from None
        for name, obj in stateful.items():
            obj.load_state_dict(decode_tree(self.meta["stateful"][name], tensors))
        return decode_tree(self.meta["state"], tensors)


class _LazyTensors(Mapping):
    """Tensors of a checkpoint read one at a time (for ``state`` and ``rng``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / TENSORS_NAME), "pt") as f:
            if key not in f.keys():
                raise KeyError(key)
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        from safetensors import safe_open

        with safe_open(str(self.path / TENSORS_NAME), "pt") as f:
            return key in f.keys()

    def __iter__(self):
        from safetensors import safe_open

        with safe_open(str(self.path / TENSORS_NAME), "pt") as f:
            return iter(list(f.keys()))

    def __len__(self) -> int:
        return len(list(iter(self)))


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Read a checkpoint's metadata (the tensors are read by ``Checkpoint.restore``)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: no readable {META_NAME} ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{folder}: format_version {got!r}, this capline writes {FORMAT_VERSION}")
    if not (folder / TENSORS_NAME).is_file():
        raise CheckpointError(f"{folder}: {TENSORS_NAME} is missing")
    try:
        return Checkpoint(path=folder, step=int(meta["step"]), digest=str(meta["digest"]),
                          identity=dict(meta["identity"]), meta=meta)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: {META_NAME} lacks {err}") from None


# ------------------------------------------------------ a folder of them
class Checkpoints:
    """The checkpoints of one run kind in ``root``: ``<prefix>-<step>`` folders.

    ``save`` writes one and keeps the newest ``keep`` of that prefix; ``latest``
    returns the newest one whose identity equals this run's, logging why each
    newer one was skipped.
    """

    def __init__(self, root: str | Path, identity: Mapping[str, Any], keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.identity = _plain(identity)
        self.digest = identity_digest(identity)
        self.keep = keep

    def path(self, step: int, prefix: str = "step") -> Path:
        return self.root / f"{prefix}-{int(step):09d}"

    def steps(self, prefix: str = "step") -> list[int]:
        """Steps of the finished ``prefix`` checkpoints in ``root``, oldest first."""
        if not self.root.is_dir():
            return []
        pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)$")
        found = (pattern.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, step: int, prefix: str = "step", keep: Optional[int] = None, **contents: Any) -> Path:
        """``save_checkpoint`` as ``<prefix>-<step>``, then only the newest ``keep`` of the
        prefix stay (checkpoints of another identity count and go too)."""
        folder = save_checkpoint(self.path(step, prefix), step=step, identity=self.identity, **contents)
        keep = self.keep if keep is None else keep
        for old in self.steps(prefix)[:-keep]:
            shutil.rmtree(self.path(old, prefix), ignore_errors=True)
        return folder

    def latest(self, prefix: str = "step", quiet: bool = False) -> Optional[Checkpoint]:
        """The newest ``prefix`` checkpoint this run can resume from, or None.

        Each newer one that cannot be used (unreadable, another identity) is logged
        with the reason. Leftover temporaries of a killed save are removed.
        """
        self.clean(prefix)
        for step in reversed(self.steps(prefix)):
            path = self.path(step, prefix)
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as err:
                if not quiet:
                    log.warning("checkpoint %s ignored: %s", path, err)
                continue
            if ckpt.digest != self.digest:
                if not quiet:
                    log.warning("checkpoint %s ignored: made by another run (%s)", path,
                                describe_difference(ckpt.identity, self.identity))
                continue
            return ckpt
        return None

    def remove(self, prefix: str = "step", except_steps: Iterable[int] = ()) -> None:
        """Delete the ``prefix`` checkpoints whose steps are not in ``except_steps``."""
        keep = set(except_steps)
        for step in self.steps(prefix):
            if step not in keep:
                shutil.rmtree(self.path(step, prefix), ignore_errors=True)
        self.clean(prefix)

    def clean(self, prefix: str = "step") -> None:
        """Remove what killed saves of ``prefix`` checkpoints left behind (never whole)."""
        if not self.root.is_dir():
            return
        for stale in self.root.glob(f".{prefix}-*"):
            if stale.name.endswith((".tmp", ".old")):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
