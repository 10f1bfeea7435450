"""The local launcher: every run not yet done, one at a time or N at a time, each in its own process."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from .driver import train_command
from .runs import prepare_run, run_status, write_plan
from .spec import Grid, Run


class SweepBusy(RuntimeError):
    """Another launcher holds the sweep folder."""


@contextlib.contextmanager
def exclusive(runs_dir: Path):
    """Hold RUNS_DIR/.lock while launching, so two launchers never redo each other's running runs."""
    with open(Path(runs_dir) / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusy(f"{runs_dir} is in use by another sweep launcher") from None
        yield


def threads_per_process(parallel: int, nproc: int, cpus: int | None = None) -> int:
    """The cores shared out: each of the parallel × nproc training processes gets cpus // (parallel × nproc)."""
    return max(1, (cpus or os.cpu_count() or 1) // (parallel * nproc))


def describe(grid: Grid, runs: list[Run], runs_dir: Path) -> str:
    """The plan as text (for --dry-run): status, name, command."""
    lines = [f"{len(runs)} runs of {grid.path} in {runs_dir}:"]
    for run in runs:
        command = shlex.join(["python", *train_command(grid, run, runs_dir)[1:]])
        lines.append(f"  [{run_status(runs_dir, run.name):>7}] {run.name}\n            {command}")
    return "\n".join(lines)


def _run_one(grid: Grid, run: Run, runs_dir: Path, env: dict) -> tuple[Run, int, Path]:
    prepare_run(runs_dir, run, train_command(grid, run, runs_dir))  # just before it starts: no empty attempts
    log = Path(runs_dir) / run.name / "sweep.log"
    argv = [sys.executable, "-m", "open_clip_po.sweep.driver", "run", str(runs_dir), "--index", str(run.index)]
    with open(log, "w", encoding="utf-8") as f:
        status = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    return run, status, log


def launch_local(grid: Grid, runs_dir: Path, parallel: int = 1, quiet: bool = False) -> dict:
    """Run every run of ``grid`` not yet done under ``runs_dir``; returns {"done", "skipped", "failed": [...]}.

    A failing run is recorded (failed.json, its log) and the others go on."""
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = grid.runs()
    nproc = grid.launch.get("nproc", 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(parallel, nproc)), "PYTHONUNBUFFERED": "1"}
    summary = {"done": [], "skipped": [], "failed": []}
    with exclusive(runs_dir):
        write_plan(grid, runs, runs_dir)
        todo = [run for run in runs if run_status(runs_dir, run.name) != "done"]
        summary["skipped"] = [run.name for run in runs if run not in todo]
        bar = tqdm(total=len(todo), desc=f"sweep {grid.name}", unit="run", disable=quiet or not todo)
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for future in as_completed([pool.submit(_run_one, grid, run, runs_dir, env) for run in todo]):
                run, status, log = future.result()
                if status == 0:
                    summary["done"].append(run.name)
                else:
                    summary["failed"].append({"name": run.name, "exit_status": status, "log": str(log)})
                    tqdm.write(f"sweep: {run.name} failed (exit {status}); see {log}", file=sys.stderr)
                bar.set_postfix(done=len(summary["done"]), failed=len(summary["failed"]))
                bar.update()
        bar.close()
    return summary

