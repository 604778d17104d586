"""Starting capline stages under torchrun from tests: one node, or several nodes on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The test's environment, one torch thread per process, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def standalone(nproc: int, stage_args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m stages.cli ...``"""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "stages.cli", *stage_args]


def node(nnodes: int, node_rank: int, port: int, stage_args: Sequence[str]) -> list[str]:
    """One node (one process) of an ``nnodes``-node job meeting by c10d rendezvous on 127.0.0.1:port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", f"capline-test-{port}", "-m", "stages.cli", *stage_args]


def run_torchrun(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_nodes(cmds: list[list[str]], cwd: Path, timeout: int = 300) -> None:
    """Start every node's command at once and wait for all; each must succeed."""
    procs = [subprocess.Popen(c, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
