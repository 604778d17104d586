"""The one runtime policy: device choice, precision rules, ranks and per-rank names."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core.params import ParamsError
from pipeline.core.runtime import Rank, autocast, choose_device, choose_precision, cpu_has_fast_bf16, rank_path


def test_device_names(monkeypatch):
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pipeline.core.runtime._mps_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(ParamsError, match=r"train.device: 'cuda' asked for, but torch sees no CUDA"):
        choose_device("cuda", key="train.device")
    with pytest.raises(ParamsError, match="device: 'tpu' is not one of auto, cpu, cuda, cuda:N, mps"):
        choose_device("tpu")
    with pytest.raises(ParamsError, match="no MPS device"):
        choose_device("mps")


def test_cuda_device_follows_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    rank = Rank(rank=5, world_size=8, local_rank=5)
    assert choose_device("auto", rank) == torch.device("cuda", 1)
    assert choose_device("cuda", rank) == torch.device("cuda", 1)
    assert choose_device("cuda:2", rank) == torch.device("cuda", 2)
    with pytest.raises(ParamsError, match="CUDA devices 0..3"):
        choose_device("cuda:4", rank)


def test_precision_policy(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    monkeypatch.setattr("pipeline.core.runtime.cpu_has_fast_bf16", lambda: False)
    assert choose_precision("auto", cpu) == "fp32"
    monkeypatch.setattr("pipeline.core.runtime.cpu_has_fast_bf16", lambda: True)
    assert choose_precision("auto", cpu) == "bf16"
    assert choose_precision("fp32", cpu) == "fp32" and choose_precision("bf16", cpu) == "bf16"
    with pytest.raises(ParamsError, match="generate.precision: fp16 needs a GPU"):
        choose_precision("fp16", cpu, key="generate.precision")
    with pytest.raises(ParamsError, match="clip.precision: 'fp8' is not one of"):
        choose_precision("fp8", cpu, key="clip.precision")
    # CUDA: bf16 where the GPU has it, else fp16 (never silently fp32).
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_precision("auto", cuda) == "fp16"
    assert choose_precision("fp16", cuda) == "fp16"


def test_autocast_runs_matmuls_in_the_chosen_precision():
    cpu = torch.device("cpu")
    a = torch.randn(4, 4)
    with autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32


def test_ranks_and_their_output_names():
    assert rank_path("m/embed.json", Rank()) == Path("m/embed.json")
    assert rank_path("m/embed.json", Rank(2, 4)) == Path("m/embed.rank2.json")
    assert [i for i in range(10) if Rank(1, 3).owns(i)] == [1, 4, 7]
    with pytest.raises(ParamsError, match="--rank: 3 is outside 0..2"):
        Rank(3, 3)


def test_one_gpu_index_is_refused_for_several_processes_per_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    rank = Rank(rank=1, world_size=2, local_rank=1)
    with pytest.raises(ParamsError, match=r"device: 'cuda:0' puts all 2 processes of this node on one GPU"):
        choose_device("cuda:0", rank)
    assert choose_device("cuda", rank) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine (ranks started by hand)
    assert choose_device("cuda:0", rank) == torch.device("cuda", 0)
