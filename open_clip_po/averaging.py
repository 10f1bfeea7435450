"""Weight averaging: BMA (paper App. H, Eq. 37–39; CLIPood's GeneralMovingAverage) and EMA.

Both keep a float copy of the model's floating-point parameters, keyed by the un-prefixed names of
``model.state_dict()`` (so DDP's "module." never leaks in), and are updated after every optimizer step.
Non-floating state (buffers such as position ids) is taken from the live model when the average is used.

BMA weights step t by ``α_t = Beta(γ, γ).pdf((t + 0.5) / (T + 1))`` for T total steps; with γ < 1 both ends of
training weigh more than the middle. Running form, starting from θ_0 with weight α_0::

    r = α_t / Σ_{s<t} α_s ;  avg ← (avg + r θ_t) / (1 + r) ;  Σ ← Σ + α_t

which equals Σ_t α_t θ_t / Σ_t α_t.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .towers.unwrap import unwrap


def beta_pdf(x: float, gamma: float) -> float:
    """Density of the symmetric Beta(γ, γ) distribution at x ∈ (0, 1)."""
    log_norm = math.lgamma(2 * gamma) - 2 * math.lgamma(gamma)
    return math.exp(log_norm + (gamma - 1) * (math.log(x) + math.log1p(-x)))


def bma_weight(step: int, total_steps: int, gamma: float) -> float:
    """α_t of Eq. 38: the Beta(γ, γ) density at the step's position in (0, 1)."""
    return beta_pdf((step + 0.5) / (total_steps + 1), gamma)


def _float_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in unwrap(model).named_parameters() if p.is_floating_point()}


class _Average:
    kind = ""

    def __init__(self, model: nn.Module):
        self.average = {name: p.detach().clone().float() for name, p in _float_params(model).items()}
        self.num_updates = 0

    @torch.no_grad()
    def _blend(self, model: nn.Module, keep: float, take: float) -> None:
        for name, p in _float_params(model).items():
            avg = self.average[name]
            avg.mul_(keep).add_(p.detach().float(), alpha=take)

    def state(self) -> dict:
        return {"num_updates": self.num_updates}

    def load(self, kind: str, weights: dict, state: dict) -> None:
        """Restore from a checkpoint's averaged weights (un-prefixed names, head included) and counters."""
        if kind != self.kind:
            raise ValueError(f"checkpoint holds {kind} weights, this run averages with {self.kind}")
        missing = set(self.average) - set(weights)
        if missing:
            raise ValueError(f"averaged weights in the checkpoint miss {sorted(missing)[:3]}")
        for name in self.average:
            self.average[name].copy_(weights[name])
        self.num_updates = int(state["num_updates"])

    def averaged_state_dict(self, state_dict: dict) -> dict:
        """``state_dict`` (the live model's, un-prefixed) with every averaged entry replaced by its average."""
        out = dict(state_dict)
        for name, avg in self.average.items():
            out[name] = avg.to(out[name].dtype)
        return out

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in _float_params(model).items():
            p.copy_(self.average[name].to(p.dtype))


class BMA(_Average):
    kind = "bma"

    def __init__(self, model: nn.Module, total_steps: int, gamma: float = 0.7):
        if total_steps < 1:
            raise ValueError(f"BMA needs at least one training step, got total_steps={total_steps}")
        if gamma <= 0:
            raise ValueError(f"--po-bma-gamma must be > 0, got {gamma}")
        super().__init__(model)
        self.total_steps, self.gamma = total_steps, gamma
        self.weight_sum = bma_weight(0, total_steps, gamma)

    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        weight = bma_weight(self.num_updates, self.total_steps, self.gamma)
        relative = weight / self.weight_sum
        self._blend(model, keep=1 / (1 + relative), take=relative / (1 + relative))
        self.weight_sum += weight

    def state(self) -> dict:
        return {**super().state(), "weight_sum": self.weight_sum, "total_steps": self.total_steps,
                "gamma": self.gamma}

    def load(self, kind: str, weights: dict, state: dict) -> None:
        super().load(kind, weights, state)
        self.weight_sum = float(state["weight_sum"])


class EMA(_Average):
    kind = "ema"

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--po-ema-decay must be in [0, 1), got {decay}")
        super().__init__(model)
        self.decay = decay

    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        self._blend(model, keep=self.decay, take=1.0 - self.decay)

    def state(self) -> dict:
        return {**super().state(), "decay": self.decay}


def create_averager(kind: str, model: nn.Module, total_steps: int, gamma: float, decay: float):
    if kind == "none":
        return None
    if kind == "bma":
        return BMA(model, total_steps, gamma)
    if kind == "ema":
        return EMA(model, decay)
    raise ValueError(f"--po-average must be none, bma or ema, got {kind!r}")
