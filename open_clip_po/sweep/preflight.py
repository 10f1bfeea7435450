"""Every run's flags read by the training command's own parser before any run starts.

Without this, a misspelt flag in ``[base]`` launched every run, and each failed at start with open_clip's
"unrecognized arguments". Here each run's command line goes through ``open_clip_po.flags.po_argument_parser``
and then ``open_clip_train.params.parse_args``, as ``open_clip_po.main`` reads it; the first that does not parse
(an unknown flag, a value of the wrong type, a choice not offered) refuses the sweep with one line naming the
table it came from. Only parsing: on SLURM ``po_launch`` adds flags of its own (``--train-data`` from
``DATA_DIR``, ...), so whether a run's flags make sense together is still the run's own start-up check.
"""
from __future__ import annotations

import contextlib
import io
import re

from open_clip_train.params import parse_args as open_clip_parse_args

from ..flags import po_argument_parser
from .spec import Grid, GridError, Run, main_argv


def _argparse_error(argv: list[str]) -> str | None:
    """argparse's own message if ``argv`` does not parse (it would print usage and exit 2), else None."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            _, rest = po_argument_parser().parse_known_args(argv)
            open_clip_parse_args(rest)
    except SystemExit:
        errors = [line for line in captured.getvalue().splitlines() if ": error: " in line]
        return errors[-1].split(": error: ", 1)[1] if errors else captured.getvalue().strip() or "does not parse"
    return None


def _where(grid: Grid, run: Run, flag: str) -> str:
    """The table of the grid file that gives ``flag``."""
    if flag in grid.base:
        return "[base]"
    if flag in grid.axes:
        return "[axes]"
    for i, point in enumerate(grid.points):
        if flag in point and run.settings.get(flag) == point[flag]:
            return f"[[points]] #{i + 1}"
    return f"run {run.name}"


def check_flags(grid: Grid, runs: list[Run]) -> None:
    """GridError for the first run whose flags ``open_clip_po.main`` would refuse."""
    for run in runs:
        error = _argparse_error(main_argv(run.flags) + ["--logs-dir", "RUNS_DIR", "--name", run.name])
        if error is None:
            continue
        named = re.findall(r"--([A-Za-z0-9][A-Za-z0-9_-]*)", error)
        flag = next((f for f in named if f in run.flags), None)
        where = _where(grid, run, flag) if flag else f"run {run.name}"
        raise GridError(f"{grid.path} {where}: {error} (python -m open_clip_po.main would refuse "
                        f"{'every run' if where == '[base]' else 'run ' + run.name}; nothing was started)")
