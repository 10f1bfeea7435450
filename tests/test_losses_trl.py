"""TRL's loss types on the contrastive policy: each objective against a float64 transcription of TRL's formula.

``trl_losses`` below is written from TRL's ``DPOTrainer.dpo_loss`` (and ``CPOTrainer.cpo_loss`` for SimPO,
``ORPOTrainer.odds_ratio_loss`` for ORPO, ``RunningMoments`` for BCO's baseline), with TRL's variable names
and special cases, independently of open_clip_po's code. Then: which objectives depend on θ only through
the log-ratio difference (Lemma 3.1), and the direction of the gradient at θ = ref.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from open_clip_po import losses as L

torch.set_num_threads(1)
F64 = torch.float64
BETAS = [0.1, 1.0, 2.5]


def batch(seed=0, n=7, spread=2.0):
    """Log-probs of a contrastive policy and its reference: rows of log_softmax over 2n candidates."""
    g = torch.Generator().manual_seed(seed)
    policy = torch.log_softmax(spread * torch.randn(n, 2 * n, generator=g, dtype=F64), dim=-1)
    ref = torch.log_softmax(spread * torch.randn(n, 2 * n, generator=g, dtype=F64), dim=-1)
    idx = torch.arange(n)
    return policy[idx, idx], policy[idx, n + idx], ref[idx, idx], ref[idx, n + idx]


# ---------------------------------------------------------------- TRL, transcribed

class RunningMomentsTRL:
    """trl.trainer.utils.RunningMoments.update, one process."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        self.mean = self.mean + delta * xs_count / tot_count
        self.var = (old_sum + new_sum) / tot_count
        self.count = tot_count


def trl_cap_exp(value):
    cap = math.floor(math.log(torch.finfo(value.dtype).max) * 10 ** 4) / 10 ** 4
    return torch.exp(torch.clamp(value, max=cap))


def trl_logits(pc, pr, rc, rr, f_divergence_type, alpha):
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    if f_divergence_type == "alpha_divergence":
        return (trl_cap_exp(rejected_logratios * -alpha) - trl_cap_exp(chosen_logratios * -alpha)) / alpha
    logits = (pc - pr) - (rc - rr)
    if f_divergence_type == "js_divergence":
        logits = logits - (F.softplus(chosen_logratios) - F.softplus(rejected_logratios))
    return logits


def trl_losses(loss_type, pc, pr, rc, rr, beta, label_smoothing=0.0, f_divergence_type="reverse_kl", alpha=1.0,
               discopop_tau=0.05, running=None, simpo_gamma=0.5):
    """Per-sample losses as TRL computes them (float64)."""
    logits = trl_logits(pc, pr, rc, rr, f_divergence_type, alpha)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "exo_pair":
        if label_smoothing == 0:
            label_smoothing = 1e-3
        return (beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - label_smoothing)) + (
            -beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(label_smoothing))
    if loss_type == "bco_pair":
        rewards = torch.cat((beta * chosen_logratios, beta * rejected_logratios), 0).mean().detach()
        running.update(rewards)
        delta = running.mean
        return -F.logsigmoid((beta * chosen_logratios) - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = chosen_logratios * beta, rejected_logratios * beta
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))
    if loss_type in ("aot_pair", "aot"):
        if loss_type == "aot_pair":
            delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
        else:
            delta = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    if loss_type == "apo_zero":
        return (1 - F.sigmoid(beta * chosen_logratios)) + F.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return F.sigmoid(beta * chosen_logratios) + (1 - F.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        logits = ((pc - pr) - (rc - rr)) * beta
        log_ratio_modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - log_ratio_modulation) + torch.exp(-logits) * log_ratio_modulation
    if loss_type == "simpo":  # CPOTrainer.cpo_loss
        logits = (pc - pr) - simpo_gamma / beta
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "orpo":  # ORPOTrainer: policy_nll_loss - odds_ratio_loss
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        return -pc - beta * F.logsigmoid(log_odds)
    raise AssertionError(loss_type)


# ---------------------------------------------------------------- each objective vs TRL

SIMPLE = ["nca_pair", "sppo_hard", "apo_zero", "apo_down"]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", SIMPLE)
def test_beta_only_objectives_match_trl(name, beta):
    inputs = batch(seed=int(beta * 10))
    out = L.get_loss(name, beta=beta)(*inputs)
    assert out["loss"].item() == pytest.approx(trl_losses(name, *inputs, beta).mean().item(), rel=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("name", ["aot", "aot_pair", "aot_unpaired"])
def test_aot_sorts_over_the_batch_like_trl(name, beta, eps):
    inputs = batch(seed=3)
    out = L.get_loss(name, beta=beta, label_smoothing=eps)(*inputs)
    trl_name = "aot" if name == "aot" else "aot_pair"
    assert out["loss"].item() == pytest.approx(trl_losses(trl_name, *inputs, beta, eps).mean().item(), rel=1e-12)
    # sorting matters: the same pairs unsorted give another value
    pc, pr, rc, rr = inputs
    unsorted = L.get_loss("dpo", beta=beta, label_smoothing=eps)(pc, pr, rc, rr)["loss"] if name == "aot" else None
    if unsorted is not None:
        assert abs(unsorted.item() - out["loss"].item()) > 1e-6


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.2, 0.5])
def test_exo_pair_matches_trl_including_its_zero_smoothing_rule(beta, eps):
    inputs = batch(seed=4)
    loss = L.get_loss("exo_pair", beta=beta, label_smoothing=eps)
    assert loss(*inputs)["loss"].item() == pytest.approx(
        trl_losses("exo_pair", *inputs, beta, eps).mean().item(), rel=1e-12)
    assert loss.label_smoothing == (eps or 1e-3)  # TRL replaces 0 by 1e-3: log ε must be finite
    assert math.isfinite(loss(*inputs)["loss"].item())


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_matches_trl(beta, tau):
    inputs = batch(seed=5)
    out = L.get_loss("discopop", beta=beta, discopop_tau=tau)(*inputs)
    assert out["loss"].item() == pytest.approx(
        trl_losses("discopop", *inputs, beta, discopop_tau=tau).mean().item(), rel=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("fdiv,alpha", [("reverse_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5),
                                        ("alpha_divergence", 1.0), ("alpha_divergence", 2.0)])
def test_dpo_f_divergences_match_trl(beta, eps, fdiv, alpha):
    inputs = batch(seed=6)
    out = L.get_loss("dpo", beta=beta, label_smoothing=eps, f_divergence_type=fdiv, f_alpha_divergence_coef=alpha)
    want = trl_losses("sigmoid", *inputs, beta, eps, f_divergence_type=fdiv, alpha=alpha).mean().item()
    assert out(*inputs)["loss"].item() == pytest.approx(want, rel=1e-12)


def test_dpo_alpha_divergence_caps_the_exponent_like_trl():
    # a log-ratio of -1000 would overflow exp(α·1000): TRL caps the exponent at log(max float)
    pc, pr, rc, rr = (torch.tensor([v], dtype=F64) for v in (-1000.0, -1.0, 0.0, -1.0))
    out = L.get_loss("dpo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)(pc, pr, rc, rr)
    want = trl_losses("sigmoid", pc, pr, rc, rr, 1.0, f_divergence_type="alpha_divergence", alpha=1.0)
    assert out["loss"].item() == want.item() and math.isfinite(out["loss"].item())


def test_reverse_kl_is_plain_dpo_and_sigmoid_is_its_trl_name():
    inputs = batch(seed=7)
    plain = L.get_loss("dpo", beta=0.7)(*inputs)["loss"]
    assert L.get_loss("dpo", beta=0.7, f_divergence_type="reverse_kl")(*inputs)["loss"].item() == plain.item()
    assert L.get_loss("sigmoid", beta=0.7)(*inputs)["loss"].item() == plain.item()
    assert type(L.get_loss("sft")).__name__ == "CELoss"
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        L.get_loss("dpo", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef"):
        L.get_loss("dpo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gamma,eps", [(0.5, 0.0), (1.4, 0.0), (0.0, 0.1)])
def test_simpo_matches_trl_cpo_and_needs_no_reference(beta, gamma, eps):
    pc, pr, rc, rr = batch(seed=8)
    loss = L.get_loss("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    assert loss.requires_reference is False
    want = trl_losses("simpo", pc, pr, rc, rr, beta, eps, simpo_gamma=gamma).mean().item()
    assert loss(pc, pr)["loss"].item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_and_stays_finite_where_trl_does_not(beta):
    pc, pr, rc, rr = batch(seed=9)
    loss = L.get_loss("orpo", beta=beta)
    out = loss(pc, pr)
    assert out["loss"].item() == pytest.approx(trl_losses("orpo", pc, pr, rc, rr, beta).mean().item(), rel=1e-12)
    log_odds = (pc - pr) - (torch.log1p(-pc.exp()) - torch.log1p(-pr.exp()))
    assert out["log_odds_chosen"].item() == pytest.approx(log_odds.mean().item(), rel=1e-12)
    assert out["nll_loss"].item() == pytest.approx(-pc.mean().item(), rel=1e-12)
    assert out["rewards/chosen"].item() == pytest.approx(beta * pc.mean().item(), rel=1e-12)  # TRL: β log π
    # a probability that rounded to 1 (log π = 0): TRL's log1p(-exp(0)) = -inf; here large and finite
    edge = loss(torch.tensor([0.0, -1e-20], dtype=F64, requires_grad=True), torch.tensor([-30.0, -30.0], dtype=F64))
    edge["loss"].backward()
    assert math.isfinite(edge["loss"].item())


@pytest.mark.parametrize("beta", BETAS)
def test_bco_pair_running_baseline_matches_trl_running_moments_over_steps(beta):
    loss, running = L.get_loss("bco_pair", beta=beta), RunningMomentsTRL()
    logged, trl_deltas = [], []
    for step in range(4):
        inputs = batch(seed=20 + step, spread=1.0 + step)
        out = loss(*inputs)
        logged.append(out["delta"])
        want = trl_losses("bco_pair", *inputs, beta, running=running).mean()
        trl_deltas.append(float(running.mean))
        assert out["loss"].item() == pytest.approx(want.item(), rel=1e-12)
        assert out["delta"].item() == pytest.approx(float(running.mean), rel=1e-12)
        assert loss.running_var.item() == pytest.approx(float(running.var), rel=1e-12, abs=1e-15)
    # the logged δ of each step stays what it was (it is not a view of the buffer that moves on)
    assert [d.item() for d in logged] == pytest.approx(trl_deltas, rel=1e-12)
    # δ after 4 steps is the mean of the 4 batch means (one observation per step)
    means = [(beta * torch.cat([c - rc_, r - rr_])).mean().item()
             for c, r, rc_, rr_ in (batch(seed=20 + s, spread=1.0 + s) for s in range(4))]
    assert loss.running_mean.item() == pytest.approx(sum(means) / 4, rel=1e-12)
    # eval mode freezes δ; the buffers travel with state_dict
    loss.eval()
    frozen = loss.running_mean.clone()
    loss(*batch(seed=99))
    assert loss.running_mean.item() == frozen.item()
    restored = L.get_loss("bco_pair", beta=beta)
    restored.load_state_dict(loss.state_dict())
    assert restored.running_mean.item() == frozen.item() and restored.running_count.item() == pytest.approx(4.0)


# ---------------------------------------------------------------- Lemma 3.1: what depends on θ only through h

# The partition function log Z(x) of each image adds the same constant to log π(y_w|x) and log π(y_l|x).
INVARIANT = ["dpo", "sigmoid", "ipo", "hinge", "robust", "ref_free", "exo_pair", "discopop", "aot", "simpo"]
NOT_INVARIANT = ["kto", "ce", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot_pair", "orpo",
                 "dpo:js_divergence", "dpo:alpha_divergence"]


def build(spec):
    name, _, fdiv = spec.partition(":")
    return L.get_loss(name, f_divergence_type=fdiv) if fdiv else L.get_loss(name)


def call(loss, pc, pr, rc, rr):
    return loss(pc, pr, rc, rr, **({"kl": 0.05} if loss.needs_kl else {}))["loss"].item()


def test_every_builtin_is_classified():
    assert {s.partition(":")[0] for s in INVARIANT + NOT_INVARIANT} | {"aot_unpaired", "sft"} == set(
        L.builtin_losses())


@pytest.mark.parametrize("spec", INVARIANT)
def test_lemma_3_1_loss_unchanged_by_a_per_image_constant(spec):
    pc, pr, rc, rr = batch(seed=11)
    shift = torch.linspace(-1.5, -0.2, pc.shape[0], dtype=F64)  # a log Z(x) per image, keeping log-probs < 0
    assert call(build(spec), pc + shift, pr + shift, rc, rr) == pytest.approx(
        call(build(spec), pc, pr, rc, rr), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("spec", NOT_INVARIANT)
def test_objectives_that_see_each_log_prob_change_with_the_constant(spec):
    pc, pr, rc, rr = batch(seed=11)
    shift = torch.linspace(-1.5, -0.2, pc.shape[0], dtype=F64)
    assert abs(call(build(spec), pc + shift, pr + shift, rc, rr) - call(build(spec), pc, pr, rc, rr)) > 1e-6


# ---------------------------------------------------------------- gradient at θ = ref

def grads_at_reference(loss, n=5):
    pc, pr, _, _ = batch(seed=12, n=n)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    rc, rr = pc.detach().clone(), pr.detach().clone()
    value = loss(pc, pr, rc, rr, **({"kl": 0.0} if loss.needs_kl else {}))["loss"]
    grads = torch.autograd.grad(value, [pc, pr], allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip((pc, pr), grads))


@pytest.mark.parametrize("spec", [s for s in INVARIANT + NOT_INVARIANT if not s.startswith("discopop")])
def test_gradient_at_reference_raises_y_w_and_lowers_y_l(spec):
    loss = build(spec)
    chosen, rejected = grads_at_reference(loss)
    if spec == "ce":  # CE does not see y_l: the softmax over the candidates lowers it
        assert (rejected == 0).all()
    else:
        assert (rejected > 0).all()
    if spec == "apo_down":  # its two anchors balance exactly at θ = ref: β σ'(0) − β σ'(0)
        assert (chosen == 0).all()
    else:
        assert (chosen < 0).all()


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.11, 1.0])
def test_discopop_gradient_at_reference_changes_sign_at_its_tau_bound(tau):
    beta = 0.5
    chosen, rejected = grads_at_reference(L.get_loss("discopop", beta=beta, discopop_tau=tau), n=4)
    # dL/dh at h = 0 is β((1 − log 2)/(4τ) − 3/4), shared equally by the B samples of the mean
    expected = beta * ((1 - math.log(2)) / (4 * tau) - 0.75) / 4
    assert chosen.tolist() == pytest.approx([expected] * 4, rel=1e-9)
    assert rejected.tolist() == pytest.approx([-expected] * 4, rel=1e-9)
    assert (expected > 0) == (tau < (1 - math.log(2)) / 3)  # TRL's default τ = 0.05 starts the wrong way
