"""Weighted sums of objectives (TRL's multi-``loss_type`` MPO; RPO = ``dpo,ce`` with weights ``1,α``).

``build_objective("dpo,ce", [1.0, 0.1], {"beta": 0.5})`` returns one module with the call contract of
every objective — ``loss(pc, pr, rc, rr, **extra)`` → ``{"loss", metrics...}`` — whose loss is
``Σ_i w_i L_i``. A single name with weight 1 is exactly ``get_loss(name, **hparams)``. The parsers turn
command-line strings (``"dpo,ce"``, ``"1,0.1"``, ``"beta=0.5,f_divergence_type=js_divergence"``) into
the arguments.
"""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .registry import get_loss, get_loss_class

__all__ = ["MixtureLoss", "build_objective", "parse_spec", "parse_weights", "parse_hparams"]


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.kind == p.VAR_KEYWORD or (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
               for p in params)


class MixtureLoss(nn.Module):
    """``Σ_i w_i L_i`` over named objectives, with each term's metrics logged under its name.

    Output: ``"loss"`` (the weighted sum, with gradient), ``"<name>/loss"`` and ``"<name>/<metric>"`` for every
    term (detached, e.g. ``"dpo/rewards/margins"``, ``"ce/loss"``), and the first term's metrics without prefix
    (``"rewards/margins"``, ...) so that a mixture logs what its leading objective would alone.
    ``requires_reference`` / ``needs_kl`` are true when any term's is. Keyword inputs (``kl=``,
    ``policy_kl_logps=``, ...) go to the terms whose ``forward`` takes them; one that no term takes is a
    TypeError.
    """

    requires_reference: bool = False
    needs_kl: bool = False

    def __init__(self, terms: Mapping[str, nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(terms) != len(weights) or not terms:
            raise ValueError(f"MixtureLoss needs one weight per term, got {len(terms)} terms, {len(weights)} weights")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = tuple(check_weights(weights, len(terms)))
        self.requires_reference = any(bool(getattr(t, "requires_reference", True)) for t in self.terms.values())
        self.needs_kl = any(bool(getattr(t, "needs_kl", False)) for t in self.terms.values())

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{name}: {w:g}" for name, w in zip(self.terms, self.weights))

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                **extra) -> dict[str, torch.Tensor]:
        routed = {name: {k: v for k, v in extra.items() if _accepts(term.forward, k)}
                  for name, term in self.terms.items()}
        unused = sorted(set(extra) - {k for kw in routed.values() for k in kw})
        if unused:
            raise TypeError(f"no objective of the mixture {', '.join(self.terms)} takes "
                            f"{', '.join(map(repr, unused))}")
        total, out, leading = 0.0, {}, None
        for (name, term), weight in zip(self.terms.items(), self.weights):
            result = term(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          **routed[name])
            total = total + weight * result["loss"]
            out.update({f"{name}/{key}": value.detach() for key, value in result.items()})
            if leading is None:
                leading = {key: value.detach() for key, value in result.items() if key != "loss"}
        return {"loss": total, **leading, **out}


def parse_spec(spec: str) -> list[str]:
    """``"dpo,ce"`` → ``["dpo", "ce"]``; empty or repeated names are a ValueError."""
    names = [n.strip() for n in str(spec).split(",")]
    if not spec or any(not n for n in names):
        raise ValueError(f"objective spec {spec!r}: give one name or comma-separated names, e.g. 'dpo' or 'dpo,ce'")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"objective spec {spec!r} names {', '.join(repeated)} more than once")
    return names


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """One finite weight ≥ 0 per term, not all zero; otherwise a ValueError saying which rule broke."""
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} loss weights for {count} objectives")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"loss weights must be finite numbers >= 0, got {w!r}")
    if not any(weights):
        raise ValueError("loss weights are all 0: at least one objective must count")
    return [float(w) for w in weights]


def _route_hparams(names: Sequence[str], hparams: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """Each hyper-parameter to every term that takes it; ``"name.hparam"`` to that term only (and wins)."""
    routed: dict[str, dict[str, object]] = {n: {} for n in names}
    scoped = {k: v for k, v in hparams.items() if "." in k}
    for key, value in hparams.items():
        if key in scoped:
            continue
        takers = [n for n in names if _accepts(get_loss_class(n), key)]
        if not takers:
            raise TypeError(f"hyper-parameter {key!r} is taken by none of the objectives {', '.join(names)}")
        for n in takers:
            routed[n][key] = value
    for key, value in scoped.items():
        scope, hparam = key.split(".", 1)
        if scope not in routed:
            raise TypeError(f"hyper-parameter {key!r} names objective {scope!r}, which is not in {', '.join(names)}")
        routed[scope][hparam] = value  # get_loss names it if that objective does not take it
    return routed


def build_objective(spec: str, weights: Sequence[float] | None = None,
                    hparams: Mapping[str, object] | None = None) -> nn.Module:
    """The objective for ``--po-loss SPEC --po-loss-weights W --po-hparam K=V``.

    ``spec``: ``"dpo"`` or ``"dpo,ce"`` (registered names, see ``list_losses``). ``weights``: one per name
    (default all 1). ``hparams``: routed to every term that takes them, ``"dpo.beta"`` to one term only; one
    that no term takes → TypeError naming it. A single name with weight 1 returns ``get_loss(name, **hparams)``
    itself; otherwise a :class:`MixtureLoss`.
    """
    names = parse_spec(spec)
    weights = check_weights([1.0] * len(names) if weights is None else weights, len(names))
    hparams = dict(hparams or {})
    if len(names) == 1 and weights == [1.0]:  # get_loss itself, with get_loss's errors
        return get_loss(names[0], **_unscoped(names[0], hparams))
    routed = _route_hparams(names, hparams)
    return MixtureLoss({n: get_loss(n, **routed[n]) for n in names}, weights)


def _unscoped(name: str, hparams: Mapping[str, object]) -> dict[str, object]:
    """``{"dpo.beta": b}`` → ``{"beta": b}`` for objective ``name``; a scope naming another objective is a TypeError."""
    out = {k: v for k, v in hparams.items() if "." not in k}
    for key, value in hparams.items():
        if "." in key:
            scope, hparam = key.split(".", 1)
            if scope != name:
                raise TypeError(f"hyper-parameter {key!r} names objective {scope!r}, which is not in {name}")
            out[hparam] = value
    return out


def parse_weights(text: str) -> list[float]:
    """``"1,0.1"`` → ``[1.0, 0.1]``; a value that is not a number is a ValueError (the range is checked later)."""
    try:
        return [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"loss weights {text!r}: expected comma-separated numbers, e.g. 1,0.1") from None


_KEY = re.compile(r"^([A-Za-z_]\w*\.)?[A-Za-z_]\w*$")
_INT = re.compile(r"^[+-]?\d+$")


def _parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text  # a word such as alpha_divergence


def parse_hparams(items: str | Iterable[str]) -> dict[str, object]:
    """``NAME=VALUE`` strings (each may hold several, comma-separated) → dict; values become int, float, bool
    (true/false) or stay strings. ``NAME`` may be scoped to one objective of a mixture: ``dpo.beta=0.5``.
    A malformed item or a name given twice is a ValueError."""
    items = [items] if isinstance(items, str) else list(items)
    out: dict[str, object] = {}
    for item in items:
        for pair in str(item).split(","):
            key, sep, value = (s.strip() for s in pair.partition("="))
            if not sep or not _KEY.match(key) or not value:
                raise ValueError(f"hyper-parameter {pair.strip()!r}: expected NAME=VALUE, e.g. beta=0.1")
            if key in out:
                raise ValueError(f"hyper-parameter {key!r} given more than once")
            out[key] = _parse_value(value)
    return out
