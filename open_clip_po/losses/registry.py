"""Objectives by name, timm-style: ``@register_loss`` for the built-ins, entry points for third-party ones.

* Built-in objectives register themselves when ``open_clip_po.losses`` is imported (each module decorates
  its class with ``@register_loss("name")``), so :func:`list_losses` is complete in a plain checkout.
* Any installed distribution that declares the entry-point group ``open_clip_po.losses``
  (``name = "module:Class"``) adds an objective with no change here; it is imported only when
  :func:`get_loss` asks for that name.

A name known both ways must point at the same class (an installed copy of this project may still
declare its built-ins as entry points); anything else is a :class:`LossEntryPointError`.
"""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points

from torch import nn

GROUP = "open_clip_po.losses"

__all__ = ["GROUP", "LossEntryPointError", "register_loss", "is_loss", "list_losses", "builtin_losses",
           "get_loss_class", "loss_hparams", "get_loss"]

_BUILTIN: dict[str, type[nn.Module]] = {}


class LossEntryPointError(ImportError):
    """An entry point of the ``open_clip_po.losses`` group cannot be loaded, is not a usable objective, or
    clashes with another registration of its name."""


def register_loss(*names: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register an objective under one or more names (the first is its own, the others
    aliases, e.g. TRL's ``loss_type`` spelling). A name taken by another class is a ValueError."""
    if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(f"register_loss needs one or more identifier names, got {names!r}")

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        _check_objective_class(cls, f"{cls.__module__}.{cls.__qualname__}")
        for name in names:
            known = _BUILTIN.get(name)
            if known is not None and _target(known) != _target(cls):
                raise ValueError(f"loss {name!r} is already registered to {_target(known)}; "
                                 f"cannot register {_target(cls)} under the same name")
            _BUILTIN[name] = cls
        return cls

    return decorate


def _target(cls: type) -> str:
    """``module:Qualname``, the spelling of an entry point's value."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _check_objective_class(cls, origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LossEntryPointError(f"{origin} does not name a torch.nn.Module subclass (got {cls!r})")
    missing = [a for a in ("requires_reference", "needs_kl") if not isinstance(getattr(cls, a, None), bool)]
    if missing:
        raise LossEntryPointError(f"{origin}: {cls.__name__} lacks the bool class attribute(s) {', '.join(missing)} "
                                  "(subclass open_clip_po.losses.PreferenceLoss)")


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


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns if p)


def list_losses(filter: str | Sequence[str] = "", exclude_filters: str | Sequence[str] = "") -> list[str]:
    """Names of all objectives (built-in, their aliases and third-party), sorted.

    ``filter`` / ``exclude_filters``: fnmatch wildcards (one or a list) as in timm's ``list_models``,
    e.g. ``list_losses("apo*")`` or ``list_losses("*_pair", exclude_filters="aot*")``.
    """
    names = set(_BUILTIN) | set(_entry_points())
    if filter:
        names = {n for n in names if _matches(n, filter)}
    if exclude_filters:
        names = {n for n in names if not _matches(n, exclude_filters)}
    return sorted(names)


def builtin_losses() -> dict[str, type[nn.Module]]:
    """The objectives this package registers itself, ``{name: class}`` (aliases included)."""
    return dict(sorted(_BUILTIN.items()))


def is_loss(name: str) -> bool:
    """True when ``name`` is registered (built in or through an entry point); nothing is imported."""
    return name in _BUILTIN or name in _entry_points()


def _clashes(name: str, eps: list[EntryPoint]) -> str | None:
    """A description of conflicting registrations of ``name``, or None when they all name one class."""
    claims: dict[str, list[str]] = {}
    if name in _BUILTIN:
        claims[_target(_BUILTIN[name])] = ["built in"]
    for ep in eps:
        claims.setdefault(ep.value.replace(" ", ""), []).append(_distribution(ep))
    if len(claims) <= 1:
        return None
    where = "; ".join(f"{target} from {', '.join(origins)}" for target, origins in claims.items())
    return f"loss {name!r} is registered more than once in group {GROUP!r}: {where}"


def get_loss_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``. Unknown name → ValueError listing the known ones; a broken
    entry point, or one that clashes with another registration of the name → :class:`LossEntryPointError`
    naming the distribution."""
    found = _entry_points()
    if name not in _BUILTIN and name not in found:
        known = sorted(set(_BUILTIN) | set(found))
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(known) or '(none registered)'}")
    eps = found.get(name, [])
    clash = _clashes(name, eps)
    if clash:
        raise LossEntryPointError(clash)
    if name in _BUILTIN:
        return _BUILTIN[name]
    ep = eps[0]
    origin = f"entry point '{ep.name} = {ep.value}' of {_distribution(ep)} (group {GROUP!r})"
    try:
        cls = ep.load()
    except Exception as e:  # whatever the plugin raises on import, report where it came from
        raise LossEntryPointError(f"{origin} failed to load: {type(e).__name__}: {e}") from e
    _check_objective_class(cls, origin)
    return cls


def _keyword_params(cls) -> tuple[list[inspect.Parameter], bool]:
    params = inspect.signature(cls).parameters.values()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def loss_hparams(name: str) -> dict[str, object]:
    """Hyper-parameters ``get_loss(name, ...)`` accepts, with their defaults, e.g. {"beta": 1.0, ...}."""
    return {p.name: p.default for p in _keyword_params(get_loss_class(name))[0]}


def get_loss(name: str, **hparams) -> nn.Module:
    """Build the objective registered under ``name`` with the given hyper-parameters.

    Hyper-parameters are named as in TRL (``beta``, ``label_smoothing``, ``desirable_weight``,
    ``discopop_tau``, ``f_divergence_type``, ...); each objective takes those that make sense for it (see
    :func:`loss_hparams`). Unknown name → ValueError listing the known ones; a hyper-parameter the
    objective does not take → TypeError naming it. Several objectives at once: ``mixture.build_objective``.
    """
    cls = get_loss_class(name)
    named, var_keyword = _keyword_params(cls)
    if not var_keyword:
        accepted = [p.name for p in named]
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise TypeError(f"loss {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                            f"it takes: {', '.join(accepted) or 'none'}")
    return cls(**hparams)
