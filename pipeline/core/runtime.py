"""The runtime every stage shares: device, precision policy, autocast, processes.

One home for the questions each stage asks of the machine:

* ``choose_device``: where to run (``auto | cpu | cuda | cuda:N | mps``; under
  torchrun ``auto`` and ``cuda`` take the GPU of the local rank).
* ``choose_precision``: the one precision policy. ``auto`` is bf16 where the
  hardware runs it natively (CUDA with bf16, CPUs with avx512_bf16 or AMX),
  fp16 on CUDA without bf16, else fp32. An explicit choice the device cannot
  run (fp16 off CUDA) is a ``ParamsError`` naming the key.
* ``autocast``: mixed precision for a resolved precision (a no-op for fp32).
* ``Rank``, ``current_rank``: who this process is (torchrun's environment or
  explicit ``--rank/--world-size``); shard ``i`` belongs to rank ``i % world_size``.
* ``process_group``, ``gather``: joining torchrun's process group (nccl on CUDA,
  gloo on the CPU) and gathering Python objects on every rank.
* ``rank_path``: the per-rank name of an output (``metrics.rank3.json``) for
  ranks started by hand, which share no process group.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from pipeline.core.errors import ParamsError
from pipeline.core.vocabulary import PRECISIONS

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the download stage needs ranks, not torch.

# Names written to feature shard attributes and metrics.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISION_OF_DTYPE_NAME = {v: k for k, v in DTYPE_NAMES.items()}


# ------------------------------------------------------------------------ ranks
@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ParamsError(f"--world-size: must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ParamsError(f"--rank: {self.rank} is outside 0..{self.world_size - 1}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank


def current_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> Rank:
    """Explicit values win; else torchrun's environment; else a single process."""
    env = os.environ
    return Rank(
        rank=int(rank if rank is not None else env.get("RANK", 0)),
        world_size=int(world_size if world_size is not None else env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


def under_torchrun() -> bool:
    """Whether torchrun set up a rendezvous that a process group can join."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def rank_path(path: str | Path, rank: Rank) -> Path:
    """``path`` for one rank of a run without a process group: ``name.rankR.ext``."""
    path = Path(path)
    if rank.world_size <= 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank.rank}{path.suffix}")


# ----------------------------------------------------------------------- device
def choose_device(requested: str = "auto", rank: Optional[Rank] = None, key: str = "device") -> torch.device:
    """The device for ``requested`` (``auto | cpu | cuda | cuda:N | mps``).

    ``auto`` is the local rank's GPU when CUDA is there, else Apple's MPS, else the
    CPU. ``cuda`` without an index also takes the local rank's GPU, so one setting
    serves every process of a torchrun job.
    """
    import torch

    local = (rank or current_rank()).local_rank
    name = (requested or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ParamsError(f"{key}: 'mps' asked for, but this machine has no MPS device")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ParamsError(f"{key}: {requested!r} asked for, but torch sees no CUDA device "
                              f"(torch {torch.__version__}; is it a CPU build?)")
        count = torch.cuda.device_count()
        if name == "cuda":
            return torch.device("cuda", local % count)
        index = name.split(":", 1)[1]
        if not index.isdigit() or int(index) >= count:
            raise ParamsError(f"{key}: {requested!r}: this machine has CUDA devices 0..{count - 1}")
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            # Every process of this node would take the same GPU (NCCL refuses that).
            raise ParamsError(f"{key}: {requested!r} puts all {os.environ['LOCAL_WORLD_SIZE']} processes of this "
                              "node on one GPU; use 'cuda' or 'auto' under torchrun (each takes its local rank's)")
        return torch.device("cuda", int(index))
    raise ParamsError(f"{key}: {requested!r} is not one of auto, cpu, cuda, cuda:N, mps")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# -------------------------------------------------------------------- precision
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with avx512_bf16 or AMX, where bf16 matmuls beat fp32 about 2x."""
    import torch

    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(precision: str, device: torch.device, key: str = "precision") -> str:
    """Resolve ``precision`` (``auto | fp32 | bf16 | fp16``) for ``device``; the one policy."""
    import torch

    if precision not in PRECISIONS:
        raise ParamsError(f"{key}: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type not in ("cuda", "mps"):
        raise ParamsError(f"{key}: fp16 needs a GPU; use bf16 or fp32 on {device.type}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"  # MPS: fp32 until its bf16 kernels are complete


def dtype_of(precision: str) -> "torch.dtype":
    """The torch dtype of a resolved precision (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for a resolved precision; fp32 runs as is."""
    import torch

    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype_of(precision)):
        yield


# ---------------------------------------------------------------- process group
@contextlib.contextmanager
def process_group(rank: Rank, device: Optional[torch.device] = None,
                  timeout: Optional[timedelta] = None) -> Iterator[bool]:
    """Join torchrun's process group for the block when there are several processes.

    Yields whether collectives are available. nccl on CUDA (each rank on its own
    GPU, set before the group exists, or all ranks would share GPU 0), gloo on the
    CPU. A group that already exists is used and left alone.
    """
    import torch
    import torch.distributed as dist

    if rank.world_size <= 1 or not under_torchrun():
        yield False
        return
    created = False
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
        created = True
    try:
        yield True
    finally:
        if created:
            dist.destroy_process_group()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (just ``[obj]`` without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_gathered_metrics(summary: dict, combine: "Callable[[list[dict]], dict]", metrics: str | Path,
                           rank: Rank, device: Optional[torch.device], timeout: timedelta) -> None:
    """One metrics file for a stage whose ranks each summarise their own shards: under
    torchrun rank 0 writes the combined summaries; ranks started by hand (no group)
    each write their own ``rank_path``."""
    from pipeline.core.files import write_metrics

    with process_group(rank, device, timeout=timeout) as grouped:
        summaries = gather(summary)
    if grouped:
        if rank.is_main:
            write_metrics(metrics, combine(summaries))
    else:
        write_metrics(rank_path(metrics, rank), combine([summary]))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the ranks in place (no-op without a group); returns it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
