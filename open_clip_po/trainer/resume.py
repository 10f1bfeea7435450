"""``--resume``: only training checkpoints.

open_clip's ``--resume latest`` (without ``--save-most-recent``) takes the last ``*.pt`` under ``checkpoints``
in natural sort order; a file written there by something else, e.g. ``svd_scale``'s ``epoch_1.t0.5.head.pt``,
sorts after ``epoch_1.pt`` and was taken, and the run died on ``KeyError: 'optimizer'``. Here the same listing is
walked from the newest file back to the first one that holds training state; every file passed over is named in a
log line. A file given explicitly that is not a training checkpoint is a one-line error saying what it is.
"""
from __future__ import annotations

import glob
import logging

from open_clip_train.main import natural_key

from ..checkpoint import peek_checkpoint

TRAINING_KEYS = ("epoch", "optimizer")
SURGERY_KEY = "po_svd_scale"


def not_training_reason(ckpt) -> str | None:
    """Why a loaded checkpoint cannot be resumed (None if it can)."""
    if not isinstance(ckpt, dict):
        return None
    surgery = ckpt.get(SURGERY_KEY)
    if isinstance(surgery, dict):
        return (f"it was written by svd_scale (t = {surgery.get('t')}, from {surgery.get('source')}) and holds no "
                "optimizer state")
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if "epoch" in ckpt and missing:
        return f"it has no {' or '.join(missing)} state"
    return None


def latest_training_checkpoint(path: str, remote: bool, open_clip_find) -> str | None:
    """``open_clip_train.main.get_latest_checkpoint`` that passes over files without training state."""
    if remote:
        return open_clip_find(path, remote)  # s3 listings: open_clip's own behaviour
    candidates = sorted(glob.glob(path + "**/*.pt", recursive=True), key=natural_key)  # open_clip's listing
    for candidate in reversed(candidates):
        ckpt = peek_checkpoint(candidate)
        reason = not_training_reason(ckpt) if ckpt is not None else None
        if ckpt is not None and reason is None and "epoch" not in ckpt:
            reason = "it holds weights only (no epoch, no optimizer state)"
        if reason is None:
            return candidate
        logging.info(f"--resume latest: passing over {candidate}: not a training checkpoint ({reason})")
    return None
