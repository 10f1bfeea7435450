"""Shared by the end-to-end training tests: the toy data set, the argv of a short po-tiny run, and two ways to
run the seam (in this process, or as `python -m open_clip_po.main` / torchrun with gloo)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import open_clip
import open_clip_po  # noqa: F401  (registers po-tiny)
import open_clip_train.main as ocm
from open_clip_po.checkpoint import atomic_save
from open_clip_po.trainer.seam import patched_open_clip_train
from po_toy import write_toy_shards

REPO = Path(__file__).resolve().parents[1]


def make_toy(root: Path, num_samples: int = 96, per_shard: int = 48) -> dict:
    """Toy pref/reg shards under root/shards and a po-tiny start checkpoint; paths by name."""
    patterns = write_toy_shards(root / "shards", num_samples=num_samples, per_shard=per_shard)
    torch.manual_seed(0)
    model = open_clip.create_model("po-tiny")
    pretrained = root / "pretrained.pt"
    atomic_save({"state_dict": model.state_dict()}, pretrained)
    return {**patterns, "pretrained": str(pretrained), "root": root, "num_samples": num_samples,
            "classnames": str(root / "shards" / "classnames.txt")}


def base_args(toy, logs, name, *extra, epochs=2):
    n = str(toy.get("num_samples", 96))
    return ["--model", "po-tiny", "--pretrained", toy["pretrained"], "--train-data", toy["pref"],
            "--po-reg-data", toy["reg"], "--train-num-samples", n, "--po-reg-num-samples", n,
            "--batch-size", "16", "--epochs", str(epochs), "--lr", "3e-3", "--wd", "0", "--warmup", "1",
            "--precision", "fp32", "--workers", "1", "--seed", "0", "--logs-dir", str(logs), "--name", name,
            "--aug-cfg", "scale=(1.0, 1.0)", "--save-most-recent", "--log-every-n-steps", "1", *extra]


def run_in_process(argv):
    """Run the seam in this process; returns the session (reference, hooks, ...) for inspection."""
    with patched_open_clip_train() as session:
        status = ocm.main(argv)
    assert status in (None, 0)
    return session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv, nproc=1, timeout=600, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "open_clip_po.main", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "open_clip_po.main", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
