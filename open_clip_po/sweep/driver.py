"""One run of a sweep: train (``open_clip_po.main`` on the command line), then evaluate, then the completion record.

The steps the launchers call, also as a command line (``python -m open_clip_po.sweep.driver STEP``):

    plan GRID --out RUNS_DIR          write RUNS_DIR/sweep.json; print the grid's name and the indices of the runs
                                      still to do (bash: job_name=..., pending=0,2,3)
    element RUNS_DIR --index I        (SLURM) prepare run I's folder; print it as po_launch variables (bash)
    run RUNS_DIR --index I            (local) train run I in a prepared folder, then finish it
    finish RUNS_DIR --index I --train-status S [--log FILE]
                                      evaluate run I if training exited 0, and write eval.json or failed.json
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

from ..atomic import DiskFullError
from .evaluate import evaluate_run
from .preflight import check_flags
from .runs import prepare_run, read_plan, record_done, record_failure, run_status, write_plan
from .spec import Grid, GridError, Run, load_grid, main_argv

# Flags that po_launch (scripts/slurm/common.sh) sets from these variables; every other flag of a run goes after
# them on its command line. PRETRAINED and REG_DATA are always set (empty = none), so a run gets a pretrained model
# or a regulariser on SLURM exactly when it gets one locally.
PO_LAUNCH_VARIABLES = {
    "po-loss": "PO_LOSS", "po-beta": "PO_BETA", "po-reg-lambda": "PO_REG_LAMBDA", "model": "MODEL",
    "pretrained": "PRETRAINED", "train-data": "TRAIN_DATA", "po-reg-data": "REG_DATA", "batch-size": "BATCH_SIZE",
    "lr": "LR", "epochs": "EPOCHS", "opt": "OPT", "eps": "EPS", "wd": "WD", "warmup": "WARMUP", "seed": "SEED",
    "workers": "WORKERS", "precision": "PRECISION", "train-num-samples": "TRAIN_NUM_SAMPLES",
    "po-average": "PO_AVERAGE",
}
ALWAYS_SET = ("PRETRAINED", "REG_DATA")
# po_launch reads TRAIN_NUM_SAMPLES for its warm-up only: the flag goes on the command line as well.
ALSO_AS_FLAG = {"train-num-samples"}


def train_command(grid: Grid, run: Run, runs_dir: Path) -> list[str]:
    """``python -m open_clip_po.main`` (or torchrun with [launch] nproc > 1) with the run's flags."""
    main = ["-m", "open_clip_po.main", *main_argv(run.flags), "--logs-dir", str(runs_dir), "--name", run.name]
    nproc = grid.launch.get("nproc", 1)
    if nproc == 1:
        return [sys.executable, *main]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *main]


def po_launch_shell(run: Run, runs_dir: Path) -> str:
    """Bash that sets po_launch's variables and ``run_args`` (the run's other flags) for run ``run``."""
    variables = {name: "" for name in ALWAYS_SET}
    rest = {}
    for flag, value in run.flags.items():
        if flag in PO_LAUNCH_VARIABLES and not isinstance(value, (list, bool)):
            variables[PO_LAUNCH_VARIABLES[flag]] = str(value)
        if flag not in PO_LAUNCH_VARIABLES or isinstance(value, (list, bool)) or flag in ALSO_AS_FLAG:
            rest[flag] = value
    variables.update(NAME=run.name, LOGS=str(runs_dir))
    lines = [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
    lines.append("run_args=(" + " ".join(shlex.quote(a) for a in main_argv(rest)) + ")")
    return "\n".join(lines) + "\n"


def finish(grid: Grid, run: Run, runs_dir: Path, train_status: int, log: str | None) -> int:
    """Evaluate after a successful training and write the completion record, or record the failure."""
    folder = Path(runs_dir) / run.name
    if train_status != 0:
        message = f"training exited with status {train_status}: {last_line(log)}"
        record_failure(folder, "train", message, log, train_status)
        print(f"sweep: {run.name}: training failed (exit {train_status}); see {log or folder / 'out.log'}",
              file=sys.stderr)
        return train_status
    try:
        result = evaluate_run(grid, run, folder)
    except Exception as e:  # any failure is recorded with its log, and the sweep goes on with the other runs
        traceback.print_exc()
        record_failure(folder, "eval", f"{type(e).__name__}: {e}", log, 1)
        print(f"sweep: {run.name}: evaluation failed: {e}", file=sys.stderr)
        return 1
    record_done(folder, result)
    m = result["metrics"]
    print(f"sweep: {run.name}: clean {m['clean_top1']:.4f}, attacked {m['typographic_top1']:.4f} → "
          f"{folder / 'eval.json'}")
    return 0


def last_line(log: str | None) -> str:
    """The log's last line that is not the sweep's own (usually the error), or a pointer to the log."""
    try:
        lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    except (OSError, TypeError):
        return "no log"
    lines = [line for line in lines if line.strip() and not line.startswith("sweep: ")]
    return lines[-1].strip()[:300] if lines else "(empty log)"


def run_prepared(grid: Grid, run: Run, runs_dir: Path) -> int:
    """Local: train in the folder the launcher prepared (output to this process's stdout), then finish."""
    command = train_command(grid, run, runs_dir)
    print("sweep: " + shlex.join(command), flush=True)
    status = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
    return finish(grid, run, runs_dir, status, str(Path(runs_dir) / run.name / "sweep.log"))


def plan(grid_path: str, runs_dir: Path) -> tuple[Grid, list[Run]]:
    """Write the plan; return the grid and its runs not yet done."""
    grid = load_grid(grid_path)
    runs = grid.runs()
    check_flags(grid, runs)
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    write_plan(grid, runs, runs_dir)
    return grid, [r for r in runs if run_status(runs_dir, r.name) != "done"]


def _run_at(runs_dir: Path, index: int) -> tuple[Grid, Run]:
    grid, runs = read_plan(runs_dir)
    if not 0 <= index < len(runs):
        raise GridError(f"{runs_dir}: the plan has {len(runs)} runs, no index {index}")
    return grid, runs[index]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m open_clip_po.sweep.driver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("plan", help="write RUNS_DIR/sweep.json; print the grid's name and the runs still to do")
    s.add_argument("grid", help="the sweep's TOML grid")
    s.add_argument("--out", required=True, metavar="RUNS_DIR", help="the runs' folder")
    for step, text in (("element", "(SLURM) prepare run I's folder; print it as po_launch variables"),
                       ("run", "(local) train run I in a prepared folder, then finish it"),
                       ("finish", "evaluate run I if training exited 0; write eval.json or failed.json")):
        s = sub.add_parser(step, help=text)
        s.add_argument("runs_dir", help="the runs' folder written by plan")
        s.add_argument("--index", type=int, required=True, help="the run's index in the plan (SLURM's array index)")
        if step == "finish":
            s.add_argument("--train-status", type=int, required=True, help="exit status of the training command")
            s.add_argument("--log", default=None, help="the training command's log, for the run's record")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.step == "plan":
            grid, todo = plan(args.grid, Path(args.out).resolve())
            print(f"job_name={shlex.quote(grid.name)}\npending={','.join(str(r.index) for r in todo)}")
            return 0
        runs_dir = Path(args.runs_dir).resolve()
        grid, run = _run_at(runs_dir, args.index)
        if args.step == "element":
            prepare_run(runs_dir, run, ["po_launch (scripts/slurm/common.sh)", *main_argv(run.flags)])
            sys.stdout.write(po_launch_shell(run, runs_dir))
            return 0
        if args.step == "run":
            return run_prepared(grid, run, runs_dir)
        return finish(grid, run, runs_dir, args.train_status, args.log)
    except (GridError, FileNotFoundError, RuntimeError, DiskFullError) as e:
        print(f"open_clip_po.sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
