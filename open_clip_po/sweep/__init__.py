"""Hyper-parameter sweeps: a TOML grid expanded into runs, each trained with ``open_clip_po.main`` and then
evaluated beside its checkpoint; launched locally (``python -m open_clip_po.sweep``) or as one SLURM job array
(``scripts/slurm/sweep.sh``), and collected by ``python -m open_clip_po.eval pareto``. See docs/sweeps.md."""
from .runs import read_plan, run_status
from .spec import Grid, GridError, Run, expand, grid_from_dict, load_grid, main_argv

__all__ = ["Grid", "GridError", "Run", "expand", "grid_from_dict", "load_grid", "main_argv", "read_plan",
           "run_status"]
