"""``python -m open_clip_po.eval zeroshot|tsweep|gender|kl|pareto`` (also ``open-clip-po-eval``).

The command's entry: the evaluation subcommands are ``open_clip_po.eval.cli``; ``pareto`` is the sweep's report
(``open_clip_po.sweep.pareto``).
"""
import sys

from open_clip_po.sweep.pareto import add_parser as add_pareto

from .cli import main as eval_main


def main(argv=None) -> int:
    return eval_main(argv, extra=(add_pareto,))


if __name__ == "__main__":
    sys.exit(main())
