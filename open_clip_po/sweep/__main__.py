"""``python -m open_clip_po.sweep GRID.toml --out RUNS_DIR [--parallel N] [--dry-run]``: the local launcher.

Runs every run of the grid that is not done yet (RUNS_DIR/NAME/eval.json), one at a time or N at a time, each as
``python -m open_clip_po.main`` followed by its evaluation; a broken earlier attempt is moved aside to
RUNS_DIR/.attempts/ first. A failing run is recorded (RUNS_DIR/NAME/failed.json, its log RUNS_DIR/NAME/sweep.log)
and the others go on; the exit status is 1 if any run failed. On SLURM: scripts/slurm/sweep.sh GRID. The report:
python -m open_clip_po.eval pareto RUNS_DIR. See docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import DiskFullError
from .local import SweepBusy, describe, launch_local, threads_per_process
from .preflight import check_flags
from .spec import GridError, load_grid

PROG = "python -m open_clip_po.sweep"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="sweep description (TOML; see docs/sweeps.md)")
    p.add_argument("--out", required=True, help="runs folder: one sub-folder per run, plus sweep.json (the plan)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at a time; the cores are shared out through OMP_NUM_THREADS (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="print the runs, their status and commands; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.parallel < 1:
        print(f"{PROG}: error: --parallel must be >= 1, got {args.parallel}", file=sys.stderr)
        return 2
    try:
        grid = load_grid(args.grid)
        check_flags(grid, grid.runs())
        runs_dir = Path(args.out).resolve()
        if args.dry_run:
            print(describe(grid, grid.runs(), runs_dir))
            return 0
        summary = launch_local(grid, runs_dir, parallel=args.parallel, quiet=args.quiet)
    except (GridError, SweepBusy, DiskFullError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: {len(summary['done'])} ran, {len(summary['skipped'])} already done, "
          f"{len(summary['failed'])} failed ({threads_per_process(args.parallel, grid.launch.get('nproc', 1))} "
          f"thread(s) per process) → {runs_dir}; report: python -m open_clip_po.eval pareto {runs_dir}")
    for failure in summary["failed"]:
        print(f"  failed: {failure['name']} (exit {failure['exit_status']}), log {failure['log']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
