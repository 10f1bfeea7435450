"""The paper's Tables 1 and 2 in one command, through CLIP_benchmark: ``python -m open_clip_po.eval benchmark``.

Modules: ``catalog`` (the data sets and where they live), ``cbench`` (the one importer of clip_benchmark and its
work-arounds), ``sources`` and ``real_typographic`` (reading them), ``attack`` (Defense-Prefix's typographic copy),
``samples`` (a process's share of the images), ``evaluate`` (predictions and metrics), ``distributed``
(torchrun), ``models`` (rows, PAINT interpolation), ``save`` (``--save-typographic``), ``tables`` (the output),
``run`` and ``cli`` (the subcommand). See docs/eval.md.
"""
from .cli import add_parser

__all__ = ["add_parser"]  # run.run_benchmark is imported where it runs: it pulls in torch, PIL and clip_benchmark
