"""Evaluation: clean vs typographic zero-shot accuracy, the t-sweep, gender flipping, KL to the reference, and the
Pareto report of a hyper-parameter sweep.

Command line: ``python -m open_clip_po.eval zeroshot|sweep|gender|kl|pareto --help``. In code,
``typographic_eval`` gives O/T accuracy for per-epoch logging during training.
"""
from .errors import EvalError
from .gender import find_crossing, gender_curves
from .sweep import parse_t_values, sweep_metrics
from .templates import TEMPLATE_FAMILIES, resolve_templates
from .zeroshot import top1_and_written, typographic_eval

__all__ = ["EvalError", "TEMPLATE_FAMILIES", "find_crossing", "gender_curves", "parse_t_values",
           "resolve_templates", "sweep_metrics", "top1_and_written", "typographic_eval"]
