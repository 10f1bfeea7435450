"""``python -m open_clip_po.eval zeroshot|tsweep|gender|kl|pareto|benchmark`` (also ``open-clip-po-eval``).

The command's entry: the evaluation subcommands are ``open_clip_po.eval.cli``; ``pareto`` is the sweep's report
(``open_clip_po.sweep.pareto``); ``benchmark`` is Tables 1 and 2 (``open_clip_po.eval.benchmark``).
"""
import sys

from open_clip_po.sweep.pareto import add_parser as add_pareto

from .benchmark.cli import add_parser as add_benchmark
from .cli import main as eval_main


def main(argv=None) -> int:
    return eval_main(argv, extra=(add_pareto, add_benchmark))


if __name__ == "__main__":
    sys.exit(main())
