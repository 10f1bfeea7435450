"""Checkpoint surgery speed: load + W_t + fold + save of a ViT-B-32-sized checkpoint (random weights).

Runs the CLI's own code path in-process (``open_clip_po.surgery.cli.main``), on a checkpoint as
``open_clip_po.main`` writes it: stock weights with a ``module.`` prefix, a 512×512 head, and, in the
second measurement, AdamW-style optimizer state (two moments per parameter) that the surgery drops.
The file was just written, so it is read from the page cache: this measures our work, not the disk.

    python benchmarks/bench_svd_scale.py [--quick]
"""
from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

GOAL_SECONDS = 5.0


def _checkpoint(model, W, with_optimizer: bool) -> dict:
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {"epoch": 3, "name": "bench", "state_dict": state_dict, "po_head": {"weight": W}}
    if with_optimizer:
        import torch

        params = [p for p in model.parameters()] + [W]
        checkpoint["optimizer"] = {
            "state": {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(p),
                          "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(params)},
            "param_groups": [{"lr": 2e-5, "params": list(range(len(params)))}],
        }
    return checkpoint


def _time_surgery(path: Path, out: Path, repeats: int) -> tuple[float, list[float], dict]:
    """Median wall time of the CLI plus one run split into load / fold / save."""
    from open_clip_po.checkpoint import atomic_save, load_checkpoint, model_weights
    from open_clip_po.surgery.cli import fold_head, main, scale_head

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            code = main([str(path), "--t", "-2", "--out", str(out)])
        times.append(time.perf_counter() - start)
        if code != 0:
            raise RuntimeError(f"svd_scale exited with {code}")
    split = {}
    start = time.perf_counter()
    checkpoint = load_checkpoint(path)
    state_dict, W = model_weights(checkpoint)
    split["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    folded = fold_head(state_dict, scale_head(W, -2.0))
    split["scale_fold_s"] = time.perf_counter() - start
    start = time.perf_counter()
    atomic_save({"epoch": 3, "name": "bench", "state_dict": folded}, out)
    split["save_s"] = time.perf_counter() - start
    return statistics.median(times), times, split


def run(quick: bool = False) -> list[dict]:
    import torch
    import open_clip

    from open_clip_po.checkpoint import atomic_save

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")  # random init, nothing downloaded
    n_params = sum(p.numel() for p in model.parameters())
    W = torch.eye(512) + 0.01 * torch.randn(512, 512)
    repeats = 1 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_svd_scale.") as tmp:
        for with_optimizer in (False, True):
            path = Path(tmp) / ("epoch_3_opt.pt" if with_optimizer else "epoch_3.pt")
            atomic_save(_checkpoint(model, W, with_optimizer), path)
            size_mb = path.stat().st_size / 2**20
            median, times, split = _time_surgery(path, Path(tmp) / "out.pt", repeats)
            label = "with optimizer state" if with_optimizer else "model + head only"
            rows.append({
                "name": f"load + W_t + fold + save, ViT-B-32 ({label})",
                "value": median, "unit": "s", "goal": f"<= {GOAL_SECONDS:g}", "met": median <= GOAL_SECONDS,
                "details": (f"{n_params / 1e6:.0f}M params, input {size_mb:.0f} MB, t=-2, median of {repeats} "
                            f"({', '.join(f'{t:.2f}' for t in times)} s); one run split: "
                            + ", ".join(f"{k} {v:.2f}" for k, v in split.items())),
            })
    return rows


if __name__ == "__main__":
    import json

    for row in run(quick="--quick" in sys.argv[1:]):
        print(json.dumps(row))
