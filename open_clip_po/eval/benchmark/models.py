"""The rows of the table: checkpoints (or open_clip pretrained tags) and PAINT-style interpolations.

PAINT (Ilharco et al., 2022, "Patching open-vocabulary models by interpolating weights") as the paper writes it
(App. F): θ = α θ_zs + (1 − α) θ_ft, α the weight of the zero-shot model (PAINT's own code calls the fine-tuned
model's weight alpha: theirs is 1 − ours). Every floating-point tensor of the two state dicts is mixed; other
tensors come from the fine-tuned model. A linear head on one side only is mixed with the identity, which is the
other side's (head-less) model exactly. Both ends are read with their raw weights.

``--weights`` gives one choice (raw, bma, ema) for every checkpoint file or one per ``--pretrained``; a pretrained
tag has raw weights only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from open_clip_po.checkpoint import CheckpointError
from open_clip_po.head import attach_linear_head, get_linear_head, has_linear_head

from ..errors import EvalError
from ..features import load_eval_model


@dataclass(frozen=True)
class Row:
    label: str
    pretrained: str                          # checkpoint file or pretrained tag; the fine-tuned side of a mix
    weights: str = "raw"                     # raw | bma | ema (checkpoint files only)
    zero_shot: str | None = None             # the zero-shot side of a PAINT mix
    alpha: float | None = None

    def describe(self) -> dict:
        out = {"label": self.label, "pretrained": self.pretrained, "weights": self.weights}
        if self.zero_shot is not None:
            out["interpolation"] = {"zero_shot": self.zero_shot, "fine_tuned": self.pretrained, "alpha": self.alpha,
                                    "formula": "alpha * theta_zs + (1 - alpha) * theta_ft"}
        return out


def default_label(pretrained: str) -> str:
    """``logs/RUN/checkpoints/epoch_3.pt`` → ``RUN/epoch_3``; another file → its stem; a tag → itself."""
    path = Path(pretrained)
    if not (os.path.exists(pretrained) or path.suffix in (".pt", ".pth", ".bin", ".safetensors")):
        return pretrained
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.stem}"
    return path.stem


def plan_rows(pretrained: list[str], labels: list[str] | None, weights: list[str] | None,
              interpolate: list[str] | None, alphas: list[float] | None) -> list[Row]:
    labels, weights = list(labels or []), list(weights or ["raw"])
    if len(labels) > len(pretrained):
        raise EvalError(f"{len(labels)} --label for {len(pretrained)} --pretrained")
    if len(weights) not in (1, len(pretrained)):
        raise EvalError(f"--weights takes one choice or one per --pretrained ({len(pretrained)}), got {len(weights)}")
    weights = weights * len(pretrained) if len(weights) == 1 else weights
    rows = [Row(labels[i] if i < len(labels) else default_label(p), p, weights_for(p, weights[i]))
            for i, p in enumerate(pretrained)]
    if interpolate:
        zero_shot, fine_tuned = interpolate
        for alpha in alphas or [0.5]:
            if not 0.0 <= alpha <= 1.0:
                raise EvalError(f"--alpha must lie in [0, 1], got {alpha}")
            rows.append(Row(f"PAINT α={alpha:g}", fine_tuned, "raw", zero_shot, alpha))
    elif alphas:
        raise EvalError("--alpha needs --interpolate ZERO_SHOT FINE_TUNED")
    names = [r.label for r in rows]
    if len(set(names)) != len(names):
        raise EvalError(f"two rows share the label {next(n for n in names if names.count(n) > 1)!r}; use --label")
    return rows


def weights_for(pretrained: str, weights: str) -> str:
    """``--weights`` applies to checkpoint files; a pretrained tag has its raw weights only."""
    return weights if os.path.exists(pretrained) else "raw"


def interpolate_state_dicts(zero_shot: dict, fine_tuned: dict, alpha: float) -> dict:
    """α·zs + (1 − α)·ft for floating-point tensors, ft's value otherwise; both must have the same keys."""
    if set(zero_shot) != set(fine_tuned):
        different = sorted(set(zero_shot) ^ set(fine_tuned))
        raise EvalError(f"cannot interpolate: the models differ in {len(different)} weights, e.g. {different[0]!r}")
    mixed = {}
    for key, ft in fine_tuned.items():
        zs = zero_shot[key]
        if zs.shape != ft.shape:
            raise EvalError(f"cannot interpolate {key!r}: shapes {tuple(zs.shape)} and {tuple(ft.shape)}")
        mixed[key] = alpha * zs.to(ft.dtype) + (1 - alpha) * ft if ft.is_floating_point() else ft
    return mixed


def _match_heads(a, b) -> None:
    """Give a head-less model the identity head of the other's towers, so both have the same weights."""
    for model, other in ((a, b), (b, a)):
        if has_linear_head(other) and not has_linear_head(model):
            attach_linear_head(model, None, get_linear_head(other).towers)  # W = I
    if has_linear_head(a) and get_linear_head(a).towers != get_linear_head(b).towers:
        raise EvalError("cannot interpolate heads that act on different towers")


def load_row(model_name: str, row: Row, device: str):
    """``(model in eval mode, preprocess)`` for a row."""
    try:
        model, preprocess = load_eval_model(model_name, row.pretrained, weights=row.weights, device=device)
        if row.zero_shot is None:
            return model, preprocess
        zero_shot, _ = load_eval_model(model_name, row.zero_shot, device=device)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    _match_heads(zero_shot, model)
    model.load_state_dict(interpolate_state_dicts(zero_shot.state_dict(), model.state_dict(), row.alpha))
    return model.eval(), preprocess
