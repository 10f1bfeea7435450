"""A sweep's folder on disk: the plan, each run's folder and its records.

    RUNS_DIR/sweep.json          the plan: the grid and every run (written before anything runs)
    RUNS_DIR/NAME/               open_clip's run folder (--logs-dir RUNS_DIR --name NAME): checkpoints/, out.log
    RUNS_DIR/NAME/run.json       what the run is (settings, flags), written when it starts
    RUNS_DIR/NAME/eval/          open_clip_po.eval outputs (zeroshot, kl, sweep JSON/PNG)
    RUNS_DIR/NAME/eval.json      the completion record: settings + metrics, written last and atomically
    RUNS_DIR/NAME/failed.json    a failure record: which stage, the exit status, the log to read
    RUNS_DIR/.attempts/NAME.N/   earlier broken attempts, moved aside before a run is redone

A run is *done* when its eval.json exists; anything else in its folder is a broken attempt, moved aside (never
mixed with the new one) when the run is started again.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from open_clip_po.atomic import write_json

from .spec import Grid, Run, grid_from_dict

PLAN = "sweep.json"
DONE = "eval.json"
FAILED = "failed.json"
ATTEMPTS = ".attempts"


def read_json(path: Path):
    """The JSON at ``path``, or None if it is missing or unreadable (a half-written file is never final: we write
    atomically, but another tool might not)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_plan(grid: Grid, runs: list[Run], runs_dir: Path) -> Path:
    return write_json({"grid": grid.to_json(), "runs": [r.to_json() for r in runs]}, Path(runs_dir) / PLAN)


def read_plan(runs_dir: Path) -> tuple[Grid, list[Run]]:
    plan = read_json(Path(runs_dir) / PLAN)
    if plan is None:
        raise FileNotFoundError(f"{Path(runs_dir) / PLAN}: no sweep plan (launch the grid first)")
    g = plan["grid"]
    raw = {"name": g["name"], "base": g["base"], "axes": g["axes"], "points": g["points"], "eval": g["eval"],
           "launch": g["launch"]}
    grid = grid_from_dict(raw, g["path"])
    return grid, [Run(**r) for r in plan["runs"]]


def run_status(runs_dir: Path, name: str) -> str:
    """done | failed | broken (a folder without a record: interrupted, or still running) | pending."""
    folder = Path(runs_dir) / name
    if read_json(folder / DONE) is not None:
        return "done"
    if (folder / FAILED).exists():
        return "failed"
    return "broken" if folder.exists() else "pending"


def move_aside(runs_dir: Path, name: str) -> Path | None:
    """Move an unfinished run folder to RUNS_DIR/.attempts/NAME.N (N = 1, 2, ...); returns where it went."""
    folder = Path(runs_dir) / name
    if not folder.exists():
        return None
    attempts = Path(runs_dir) / ATTEMPTS
    attempts.mkdir(parents=True, exist_ok=True)
    n = 1
    while (attempts / f"{name}.{n}").exists():
        n += 1
    folder.rename(attempts / f"{name}.{n}")
    return attempts / f"{name}.{n}"


def prepare_run(runs_dir: Path, run: Run, command: list[str]) -> Path:
    """A clean folder for ``run``: a broken earlier attempt is moved aside, then run.json records what runs."""
    if run_status(runs_dir, run.name) == "done":
        raise RuntimeError(f"{Path(runs_dir) / run.name} is already done; remove its {DONE} to redo it")
    move_aside(runs_dir, run.name)
    folder = Path(runs_dir) / run.name
    folder.mkdir(parents=True)
    write_json({**run.to_json(), "command": command, "started": _now(), "slurm_job": _slurm_job()},
               folder / "run.json")
    return folder


def record_failure(folder: Path, stage: str, message: str, log: str | None, status: int | None = None) -> Path:
    return write_json({"stage": stage, "exit_status": status, "error": message, "log": log, "finished": _now(),
                       "slurm_job": _slurm_job()}, Path(folder) / FAILED)


def record_done(folder: Path, result: dict) -> Path:
    """The completion record; written last, atomically, so its presence means the run is complete."""
    return write_json({**result, "finished": _now(), "slurm_job": _slurm_job()}, Path(folder) / DONE)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _slurm_job() -> str | None:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")
