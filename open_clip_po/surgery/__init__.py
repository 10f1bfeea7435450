"""Checkpoint surgery on the linear head W (paper Sec. 3.4, Eq. 16): scale, fold, report.

``python -m open_clip_po.svd_scale`` is the command line; see docs/surgery.md.
"""
from .folding import Projection, embedding_dim, find_projection, fold_head, head_model_at
from .scaling import SurgeryError, check_head, head_stats, scale_head

__all__ = ["SurgeryError", "scale_head", "fold_head", "head_model_at", "head_stats", "check_head",
           "find_projection", "embedding_dim", "Projection"]
