"""A finished run's evaluation, beside its checkpoint: ``python -m open_clip_po.eval`` zeroshot (clean and attacked
sets), kl (to the reference) and, for ``--po-linear-head`` runs, the t-sweep — run in this process through the
eval command line (``open_clip_po.eval.cli.run``), so a run is evaluated exactly as a user would by hand."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import torch

from open_clip_po.checkpoint import CheckpointError, last_epoch_checkpoint
from open_clip_po.eval.cli import EvalCommandFailed
from open_clip_po.eval.cli import run as run_eval

from .spec import Grid, Run, format_value

DEFAULT_T = "-2:3:0.5"


class RunEvalError(RuntimeError):
    """An evaluation step failed; the message says which and why."""


def data_args(grid: Grid, run: Run, attacks: bool = True) -> list[str]:
    """The model and evaluation-set flags shared by the eval subcommands."""
    spec = grid.eval
    if "model" not in run.flags:
        raise RunEvalError(f"run {run.name} has no --model (put model = ... in [base])")
    argv = ["--model", format_value(run.flags["model"]), "--images", str(spec["images"]),
            "--batch-size", str(spec.get("batch-size", 64)), "--workers", str(spec.get("workers", 0)),
            "--device", spec.get("device") or _default_device()]
    if "classnames" in spec:
        argv += ["--classnames", str(spec["classnames"])]
    templates = spec.get("template", [])
    for template in [templates] if isinstance(templates, str) else templates:
        argv += ["--template", template]
    if "templates-for" in spec:
        argv += ["--templates-for", spec["templates-for"]]
    if attacks:
        if spec.get("attack-on-the-fly"):
            argv += ["--attack-on-the-fly", "--seed", str(spec.get("attack-seed", 0))]
        else:
            argv += ["--typographic", str(spec["typographic"])]
    return argv


def reference_of(grid: Grid, run: Run) -> str | None:
    """The KL's reference: [eval] reference, else the run's --pretrained (head runs: their own backbone)."""
    if "reference" in grid.eval:
        return str(grid.eval["reference"])
    if run.flags.get("po-linear-head") is True:
        return None  # open_clip_po.eval kl compares a head checkpoint with its own backbone (W = I)
    pretrained = run.flags.get("pretrained")
    return None if pretrained is None else format_value(pretrained)


def eval_cli(argv: list[str]) -> dict:
    """``python -m open_clip_po.eval ARGV`` in this process, echoed; returns the JSON it wrote."""
    print(f"sweep: {shlex.join([sys.executable, '-m', 'open_clip_po.eval', *argv])}", flush=True)
    try:
        return run_eval(argv)
    except EvalCommandFailed as e:
        raise RunEvalError(str(e)) from None


def evaluate_run(grid: Grid, run: Run, folder: Path) -> dict:
    """Evaluate the run's last checkpoint; returns the body of its completion record (settings + metrics)."""
    t0 = time.perf_counter()
    folder = Path(folder)
    try:
        ckpt = last_epoch_checkpoint(folder)
    except CheckpointError as e:
        raise RunEvalError(str(e)) from None
    out = folder / "eval"
    head = run.flags.get("po-linear-head") is True
    weights = ["--weights", grid.eval.get("weights", "raw")]
    zeroshot = eval_cli(["zeroshot", "--pretrained", str(ckpt), *weights, *data_args(grid, run),
                         "--output", str(out / "zeroshot.json")])["metrics"]
    metrics = {k: zeroshot.get(k) for k in ("clean_top1", "typographic_top1", "written_rate")}
    files = {"zeroshot": "eval/zeroshot.json"}

    reference = reference_of(grid, run)
    metrics["kl_to_ref"] = None
    if reference is not None or head:
        kl_argv = ["kl", "--pretrained", str(ckpt), *weights, *data_args(grid, run, attacks=False),
                   "--label", run.name, "--output", str(out / "kl.json")]
        if reference is not None:
            kl_argv += ["--ref-pretrained", reference]
        metrics["kl_to_ref"] = eval_cli(kl_argv)["metrics"][run.name]["kl_mean"]
        files["kl"] = "eval/kl.json"

    t_sweep = None
    if head:
        t = str(grid.eval.get("t", DEFAULT_T))
        t_sweep = eval_cli(["tsweep", "--pretrained", str(ckpt), *weights, *data_args(grid, run), f"--t={t}",
                            "--output", str(out / "tsweep.json")])["rows"]
        files["t_sweep"] = "eval/tsweep.json"
    return {"name": run.name, "index": run.index, "settings": run.settings, "flags": run.flags,
            "checkpoint": str(ckpt.relative_to(folder)), "linear_head": head,
            "reference": reference if reference is not None else ("own backbone" if head else None),
            "metrics": metrics, "t_sweep": t_sweep, "files": files,
            "eval_seconds": round(time.perf_counter() - t0, 1)}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
