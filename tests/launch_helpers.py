"""Helpers for tests that launch real torchrun jobs (tests/test_multinode.py, tests/test_reproducibility.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from train_helpers import REPO, free_port

PROBE = Path(__file__).with_name("run_probe.py")


def _env(probe_dir: Path) -> dict:
    probe_dir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PO_PROBE_DIR": str(probe_dir)}


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> None:
    assert proc.returncode == 0, stderr[-4000:]


def run_single_node(argv: list[str], probe_dir: Path, nproc: int, timeout: float = 600) -> None:
    """``torchrun --nproc-per-node nproc`` on this machine, through the probe."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(PROBE), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(probe_dir), capture_output=True, text=True, timeout=timeout)
    _check(proc, proc.stderr)


def run_two_nodes(argv_per_node: list[list[str]], probe_dir: Path, nproc: int, timeout: float = 600) -> None:
    """Two torchrun launchers (``--nnodes 2``) meeting through a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    launchers = []
    for node_rank, argv in enumerate(argv_per_node):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"po-test-{port}", "--local-addr", "127.0.0.1", str(PROBE), *argv]
        launchers.append(subprocess.Popen(cmd, cwd=REPO, env=_env(probe_dir), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in launchers:
            outputs.append(proc.communicate(timeout=timeout)[1])
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, stderr in zip(launchers, outputs):
        _check(proc, stderr)


def probe_records(probe_dir: Path) -> dict[int, list[dict]]:
    """rank → the probe's records of that rank, in order."""
    out = {}
    for path in sorted(probe_dir.glob("rank*.jsonl")):
        out[int(path.stem[4:])] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def losses_by_epoch(records: list[dict]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in records:
        out.setdefault(r["epoch"], []).append(float.fromhex(r["loss"]))
    return out
