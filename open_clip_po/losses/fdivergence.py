"""f-divergence DPO (Wang et al. 2023, "Beyond Reverse KL"; TRL's ``f_divergence_type``).

DPO's logit is the difference of the two log-ratios ``r = log π_θ(y|x) − log π_ref(y|x)`` because its
regulariser is the reverse KL. With another f-divergence the logit is ``f'(u_w) − f'(u_l)`` of the
probability ratios ``u = e^r`` (constants dropped), as TRL's ``dpo_loss`` computes it:

* ``reverse_kl``: ``r_w − r_l`` (= h, plain DPO);
* ``js_divergence``: ``log(2u/(1+u))`` → ``(r_w − r_l) − (softplus(r_w) − softplus(r_l))``;
* ``alpha_divergence``: ``(1 − u^{−α})/α`` → ``(e^{−α r_l} − e^{−α r_w}) / α``, exponent capped at
  log(max float) like TRL's ``cap_exp``.

Only reverse KL is a function of h alone: with JS or α the loss depends on each log-ratio, so the
partition function log Z(x) no longer cancels and the candidate set matters (unlike Lemma 3.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F_DIVERGENCE_TYPES = ("reverse_kl", "js_divergence", "alpha_divergence")


def check_f_divergence(f_divergence_type: str, f_alpha_divergence_coef: float) -> tuple[str, float]:
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCE_TYPES)}, "
                         f"got {f_divergence_type!r}")
    alpha = f_alpha_divergence_coef
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"f_alpha_divergence_coef must be a finite number > 0, got {alpha!r}")
    return f_divergence_type, float(alpha)


def cap_exp(value: torch.Tensor) -> torch.Tensor:
    """``exp(value)`` with the exponent clamped just below log(max) of its dtype (TRL's ``cap_exp``): no inf."""
    cap = math.floor(math.log(torch.finfo(value.dtype).max) * 1e4) / 1e4
    return torch.exp(value.clamp(max=cap))


def f_divergence_logits(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                        f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 1.0
                        ) -> torch.Tensor:
    """The DPO logit under the given f-divergence (see the module docstring), per sample [B]."""
    if f_divergence_type == "alpha_divergence":
        alpha = f_alpha_divergence_coef
        return (cap_exp(-alpha * rejected_logratios) - cap_exp(-alpha * chosen_logratios)) / alpha
    logits = chosen_logratios - rejected_logratios
    if f_divergence_type == "js_divergence":
        logits = logits - (F.softplus(chosen_logratios) - F.softplus(rejected_logratios))
    return logits
