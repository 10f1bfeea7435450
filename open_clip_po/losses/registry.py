"""Objectives by name, found through the ``open_clip_po.losses`` entry-point group (timm-style ``list_*``/``get_*``).

Built-ins are declared in this project's pyproject.toml; any installed distribution that declares
the same group adds an objective (``name = "module:Class"``) with no change here. Nothing is
imported until ``get_loss`` asks for that name.
"""
from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint, entry_points

from torch import nn

GROUP = "open_clip_po.losses"


class LossEntryPointError(ImportError):
    """An entry point of the ``open_clip_po.losses`` group cannot be loaded or is not a usable objective."""


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"distribution '{dist.metadata['Name']} {dist.version}'"


def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def list_losses() -> list[str]:
    """Names of all registered objectives (built-ins and third-party), sorted."""
    return sorted(_entry_points())


def get_loss_class(name: str) -> type[nn.Module]:
    """The class registered under ``name`` (imported now). Unknown name → ValueError listing the known ones;
    a broken or ambiguous entry point → :class:`LossEntryPointError` naming the distribution."""
    found = _entry_points()
    if name not in found:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(found)) or '(none registered)'}")
    eps = found[name]
    if len({ep.value for ep in eps}) > 1:
        where = "; ".join(f"{ep.value} from {_distribution(ep)}" for ep in eps)
        raise LossEntryPointError(f"loss {name!r} is registered more than once in group {GROUP!r}: {where}")
    ep = eps[0]
    origin = f"entry point '{ep.name} = {ep.value}' of {_distribution(ep)} (group {GROUP!r})"
    try:
        cls = ep.load()
    except Exception as e:  # whatever the plugin raises on import, report where it came from
        raise LossEntryPointError(f"{origin} failed to load: {type(e).__name__}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LossEntryPointError(f"{origin} does not name a torch.nn.Module subclass (got {cls!r})")
    missing = [a for a in ("requires_reference", "needs_kl") if not isinstance(getattr(cls, a, None), bool)]
    if missing:
        raise LossEntryPointError(f"{origin}: {cls.__name__} lacks the bool class attribute(s) {', '.join(missing)} "
                                  "(subclass open_clip_po.losses.PreferenceLoss)")
    return cls


def loss_hparams(name: str) -> dict[str, object]:
    """Hyper-parameters ``get_loss(name, ...)`` accepts, with their defaults, e.g. {"beta": 1.0, ...}."""
    params = inspect.signature(get_loss_class(name)).parameters.values()
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def get_loss(name: str, **hparams) -> nn.Module:
    """Build the objective registered under ``name`` with the given hyper-parameters.

    Hyper-parameters are named as in TRL (``beta``, ``label_smoothing``, ``desirable_weight``,
    ``undesirable_weight``); each objective takes those that make sense for it (see
    :func:`loss_hparams`), defaults are the paper's. Unknown name → ValueError listing the known
    ones; a hyper-parameter the objective does not take → TypeError naming it.
    """
    cls = get_loss_class(name)
    params = inspect.signature(cls).parameters.values()
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise TypeError(f"loss {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                            f"it takes: {', '.join(accepted) or 'none'}")
    return cls(**hparams)
