"""fp16 AMP (``--precision amp``): telling a step the GradScaler skipped from a bad batch.

Under ``--precision amp`` open_clip creates a ``torch.amp.GradScaler`` (active on CPU too, torch >= 2.3). The
scaler multiplies the loss by a large factor before backward; when that overflows some gradient to inf/NaN,
``scaler.step`` does not step the optimizer and ``scaler.update`` halves the scale. Such a step is the scaler
calibrating itself, not a bad batch: it must not count towards ``--po-max-bad-steps`` — the trainer only counts
non-finite *losses*, which the scaler never causes — and, since the weights did not change, it must not feed the
weight average (BMA/EMA) either.
"""
from __future__ import annotations

import logging


def loss_scale(scaler) -> float | None:
    """The scaler's current scale, or None without an active scaler (fp32, bf16)."""
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def scaler_skipped_step(scaler, scale_before: float | None) -> bool:
    """True when the optimizer step just taken through ``scaler`` was skipped for inf/NaN gradients.

    ``scale_before`` is ``loss_scale(scaler)`` read before ``scaler.step``/``scaler.update``: ``update`` lowers the
    scale exactly when the step found inf/NaN (backoff factor < 1) and keeps or raises it otherwise.
    """
    if scale_before is None:
        return False
    scale_after = loss_scale(scaler)
    if scale_after is None or scale_after >= scale_before:
        return False
    logging.info(f"GradScaler: inf/NaN gradients at loss scale {scale_before:g}, optimizer step skipped; "
                 f"scale now {scale_after:g} (not a bad step)")
    return True
