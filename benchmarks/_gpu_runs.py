"""The GPU benchmark's data-side measurements, each through the project's own command or reader: triplet shards
written by the typographic builder, the reference-cache build (``python -m open_clip_po.ref_cache``), the triplet
reader with DataLoader workers, and a short ``torchrun -m open_clip_po.main`` run."""
from __future__ import annotations

import math
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def triplet_shards(root: Path, samples: int, image_size: int, shards: int, workers: int) -> dict:
    """``samples`` attacked triplets (pref) and as many clean pairs (reg), 224 px-style JPEG, in ``shards`` shards
    each, written by ``open_clip_po.data.typographic`` from smooth random source images (``bench_data``)."""
    from bench_data import _make_folder
    from open_clip_po.data.typographic import build_typographic

    build_typographic(_make_folder(root / "images", samples, size=image_size + image_size // 8), root / "shards",
                      image_size=image_size, max_count=math.ceil(samples / shards), quiet=True,
                      workers=workers if workers > 1 else 0)
    found = {kind: sorted((root / "shards").glob(f"{kind}-*.tar")) for kind in ("pref", "reg")}
    assert all(len(urls) >= shards for urls in found.values()), found
    return {kind: str(root / "shards" / f"{kind}-*.tar") for kind in found} | {
        "samples": samples, "shards": len(found["pref"]), "image_size": image_size}


def cache_build(data: dict, model: str, batch_size: int, precision: str, env: dict) -> dict:
    """``python -m open_clip_po.ref_cache`` over the pref and reg shards; then the same command again, which finds
    every shard done and only builds the model and writes the manifest. Throughput = samples / (first − second)."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "open_clip_po.ref_cache", "--model", model, "--train-data", data["pref"],
                "--po-reg-data", data["reg"], "--aug-cfg", "scale=(1.0, 1.0)", "--precision", precision,
                "--batch-size", str(batch_size), "--out", out]
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
            seconds.append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise RuntimeError(f"ref_cache build failed: {proc.stderr[-2000:]}")
        written = len(list(Path(out, "shards").glob("*.pt")))
    samples = 2 * data["samples"]  # each triplet's image and captions, and each clean pair's
    return {"samples": samples, "shard_files": written, "first_s": seconds[0], "rerun_s": seconds[1],
            "samples_per_s": samples / max(seconds[0] - seconds[1], 1e-9)}


def reader(data: dict, model: str, batch_size: int, workers: int) -> dict:
    """``open_clip_po.data.get_po_data`` over the pref shards with ``workers`` DataLoader workers (open_clip's train
    transform, CLIP's tokenizer): epoch 0 (worker start-up included), then epochs 1–3 (persistent workers)."""
    import open_clip

    from open_clip_po.data import get_po_data

    _, preprocess, _ = open_clip.create_model_and_transforms(model)
    args = SimpleNamespace(train_data=data["pref"], batch_size=batch_size, workers=workers, seed=0,
                           train_num_samples=data["samples"])
    info = get_po_data(args, (preprocess, None), tokenizer=open_clip.get_tokenizer(model))["train"]
    passes = []
    for epoch in range(4):
        info.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for batch in info.dataloader:
            count += batch["images"].shape[0]
        passes.append({"samples": count, "seconds": time.perf_counter() - start})
    steady = passes[1:]
    return {"workers": workers, "batch_size": batch_size, "image_size": data["image_size"], "epochs": passes,
            "samples_per_s": sum(p["samples"] for p in steady) / sum(p["seconds"] for p in steady),
            "samples_per_s_with_startup": passes[0]["samples"] / passes[0]["seconds"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOSS = re.compile(r"\bloss: (\S+) \(")
REG_KL = re.compile(r"\breg_kl: (\S+) \(")
BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")


def training_run(data: dict, model: str, batch_size: int, workers: int, steps: int, precision: str, device,
                 processes: int = 1) -> dict:
    """``torchrun --nproc_per_node P -m open_clip_po.main`` for ``steps`` DPO steps with the KL regulariser, every
    step logged; the loss and reg_kl of every step must be finite. ``workers`` must divide ``steps`` (open_clip's
    rounding gives every worker the same number of batches)."""
    if steps % workers:
        raise ValueError(f"{workers} workers do not divide {steps} steps")
    backend = "nccl" if device.is_cuda else "gloo"
    with tempfile.TemporaryDirectory() as logs:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "open_clip_po.main",
                "--model", model, "--train-data", data["pref"], "--po-reg-data", data["reg"],
                "--dataset-resampled", "--train-num-samples", str(steps * batch_size * processes),
                "--po-reg-num-samples", str(data["samples"]), "--batch-size", str(batch_size), "--epochs", "1",
                "--lr", "1e-5", "--warmup", "2", "--precision", precision, "--po-loss", "dpo",
                "--workers", str(workers), "--seed", "0", "--device", device.label, "--dist-backend", backend,
                "--logs-dir", logs, "--name", "gpu-run", "--log-every-n-steps", "1"]
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, env=device.child_env(processes), capture_output=True, text=True,
                              timeout=1200)
        seconds = time.perf_counter() - start
        log_path = Path(logs, "gpu-run", "out.log")
        log = log_path.read_text() if log_path.exists() else ""
    lines = [line for line in log.splitlines() if "Train Epoch: 0 [" in line]
    losses = [float(m.group(1)) for m in map(LOSS.search, lines) if m]
    kls = [float(m.group(1)) for m in map(REG_KL.search, lines) if m]
    batch_times = [float(m.group(1)) for m in map(BATCH_TIME.search, lines[len(lines) // 2:]) if m]
    finite = len(losses) == len(kls) == steps and all(math.isfinite(v) for v in losses + kls)
    step_s = sorted(batch_times)[len(batch_times) // 2] if batch_times else float("nan")
    return {"returncode": proc.returncode, "steps_logged": len(lines), "losses": losses, "reg_kls": kls,
            "finite": finite and proc.returncode == 0 and "non-finite" not in log, "backend": backend,
            "processes": processes, "process_group": "distributed mode" in log, "seconds": seconds,
            "samples_per_s": batch_size * processes / step_s, "batch_size": batch_size, "workers": workers,
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
