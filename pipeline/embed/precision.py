"""Choosing the device and the numeric precision the encoder runs in."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Names written to the feature shards' ``dtype`` attribute and the metrics.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with avx512_bf16 or AMX, where bf16 matmuls beat fp32 ~2x."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    cpu = getattr(torch._C, "_cpu", None)
    for name in probes:
        fn = getattr(cpu, name, None)
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


def choose_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def choose_precision(precision: str, device: torch.device) -> str:
    """Resolve ``auto`` to the fastest precision the device runs well."""
    if precision != "auto":
        if precision not in DTYPES:
            raise ValueError(f"clip.precision: {precision!r} is not one of auto, fp32, bf16, fp16")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"
