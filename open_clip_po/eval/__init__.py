"""Evaluation: clean vs typographic zero-shot accuracy, the t-sweep, gender flipping and KL to the reference.

Command line: ``python -m open_clip_po.eval zeroshot|tsweep|gender|kl --help`` (``open_clip_po.eval.cli``). In
code, ``typographic_eval`` gives O/T accuracy for per-epoch logging during training.
"""
from .errors import EvalError
from .gender import gender_curves
from .templates import TEMPLATE_FAMILIES, resolve_templates
from .tsweep import find_crossing, parse_t_values, tsweep_metrics
from .zeroshot import top1_and_written, typographic_eval

__all__ = ["EvalError", "TEMPLATE_FAMILIES", "find_crossing", "gender_curves", "parse_t_values",
           "resolve_templates", "top1_and_written", "tsweep_metrics", "typographic_eval"]
