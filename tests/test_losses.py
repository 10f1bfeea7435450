"""Objectives, log-probs, regulariser and registry of open_clip_po.losses against hand computations (float64)."""
import ast
import math
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from open_clip_po import losses as L
from open_clip_po.losses import registry

torch.set_num_threads(1)
F64 = torch.float64
BUILTINS = {"dpo": "DPOLoss", "ipo": "IPOLoss", "kto": "KTOLoss", "hinge": "HingeLoss",
            "robust": "RobustDPOLoss", "ref_free": "RefFreeLoss", "ce": "CELoss"}

# Fixed log-probs of 3 samples; h = (pc - rc) - (pr - rr) = [0.7, -0.7, 1.2]
PC = [-1.0, -2.5, -0.3]
PR = [-2.0, -1.0, -4.0]
RC = [-1.5, -2.0, -0.5]
RR = [-1.8, -1.2, -3.0]
H = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def t(values, grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def inputs():
    return t(PC), t(PR), t(RC), t(RR)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def mean(xs):
    return sum(xs) / len(xs)


def features(rows, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=F64)
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- objectives vs hand computations

def test_fixture_ratios_are_mixed_sign():
    assert H == pytest.approx([0.7, -0.7, 1.2])


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_matches_hand_computation(eps):
    beta = 0.7
    out = L.get_loss("dpo", beta=beta, label_smoothing=eps)(*inputs())
    hand = mean([-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)) for h in H])
    assert out["loss"].item() == pytest.approx(hand, rel=1e-12)


def test_ipo_matches_hand_computation_and_vanishes_at_target():
    beta = 0.25  # target h = 1/(2β) = 2
    out = L.get_loss("ipo", beta=beta)(*inputs())
    assert out["loss"].item() == pytest.approx(mean([(h - 2.0) ** 2 for h in H]), rel=1e-12)
    # policy ratio exactly at the target → zero loss
    pc, pr, rc, rr = t([2.0, 2.0]), t([0.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0])
    assert L.get_loss("ipo", beta=beta)(pc, pr, rc, rr)["loss"].item() == 0.0


def test_kto_matches_hand_computation_with_weights():
    beta, ld, lu, z = 0.8, 1.3, 0.6, 0.25
    out = L.get_loss("kto", beta=beta, desirable_weight=ld, undesirable_weight=lu)(*inputs(), kl=z)
    desirable = [ld * (1 - sig(beta * ((pc - rc) - z))) for pc, rc in zip(PC, RC)]
    undesirable = [lu * (1 - sig(beta * (z - (pr - rr)))) for pr, rr in zip(PR, RR)]
    assert out["loss"].item() == pytest.approx(mean(desirable + undesirable), rel=1e-12)
    assert out["kl"].item() == pytest.approx(z)


def test_kto_clamps_reference_point_at_zero():
    loss = L.get_loss("kto", beta=0.8)
    negative = loss(*inputs(), kl=-0.4)
    zero = loss(*inputs(), kl=0.0)
    assert negative["loss"].item() == zero["loss"].item()
    assert negative["kl"].item() == 0.0
    per_sample = loss(*inputs(), kl=t([-1.0, 0.5, 0.1]))  # [B] reference points, clamped per sample
    zs = [0.0, 0.5, 0.1]
    hand = mean([1 - sig(0.8 * ((pc - rc) - z)) for pc, rc, z in zip(PC, RC, zs)]
                + [1 - sig(0.8 * (z - (pr - rr))) for pr, rr, z in zip(PR, RR, zs)])
    assert per_sample["loss"].item() == pytest.approx(hand, rel=1e-12)


def test_kto_estimates_reference_point_from_mismatched_pairs_like_trl():
    loss = L.get_loss("kto", beta=0.8)
    pkl = t([-1.0, -2.0, -0.5], grad=True)
    rkl = t([-1.5, -1.0, -1.2])
    out = loss(*inputs(), policy_kl_logps=pkl, ref_kl_logps=rkl)
    z = mean([p - r for p, r in zip([-1.0, -2.0, -0.5], [-1.5, -1.0, -1.2])])  # = 0.0667 > 0
    assert out["kl"].item() == pytest.approx(z, rel=1e-12)
    assert out["loss"].item() == pytest.approx(loss(*inputs(), kl=z)["loss"].item(), rel=1e-12)
    # z is detached: no gradient reaches the mismatched-pair log-probs
    pc = t(PC, grad=True)
    loss(pc, *inputs()[1:], policy_kl_logps=pkl, ref_kl_logps=rkl)["loss"].backward()
    assert pkl.grad is None and pc.grad is not None
    # a negative estimate is clamped to 0
    out = loss(*inputs(), policy_kl_logps=t([-3.0, -3.0, -3.0]), ref_kl_logps=t([-1.0, -1.0, -1.0]))
    assert out["kl"].item() == 0.0


def test_kto_needs_exactly_one_reference_point_source():
    loss = L.get_loss("kto")
    with pytest.raises(ValueError, match="reference point"):
        loss(*inputs())
    with pytest.raises(ValueError, match="either kl or"):
        loss(*inputs(), kl=0.1, policy_kl_logps=t(PC), ref_kl_logps=t(RC))
    with pytest.raises(ValueError, match="kl must be a scalar or of shape"):
        loss(*inputs(), kl=t([0.1, 0.2]))


def test_hinge_matches_hand_computation_and_is_flat_beyond_margin():
    beta = 2.0  # margin 1/β = 0.5: sample 0 (h=0.7) and 2 (h=1.2) are beyond it
    pc = t(PC, grad=True)
    out = L.get_loss("hinge", beta=beta)(pc, *inputs()[1:])
    assert out["loss"].item() == pytest.approx(mean([max(0.0, 1 - beta * h) for h in H]), rel=1e-12)
    out["loss"].backward()
    assert pc.grad.tolist() == pytest.approx([0.0, -beta / 3, 0.0])


def test_robust_matches_hand_computation_and_reduces_to_dpo():
    beta, eps = 0.7, 0.2
    out = L.get_loss("robust", beta=beta, label_smoothing=eps)(*inputs())
    hand = mean([(-(1 - eps) * math.log(sig(beta * h)) + eps * math.log(sig(-beta * h))) / (1 - 2 * eps)
                 for h in H])
    assert out["loss"].item() == pytest.approx(hand, rel=1e-12)
    robust0 = L.get_loss("robust", beta=beta, label_smoothing=0.0)(*inputs())["loss"]
    assert robust0.item() == pytest.approx(L.get_loss("dpo", beta=beta)(*inputs())["loss"].item(), rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.get_loss("robust", label_smoothing=0.5)


def test_ref_free_ignores_the_reference():
    beta, eps = 0.7, 0.1
    loss = L.get_loss("ref_free", beta=beta, label_smoothing=eps)
    pc, pr, rc, rr = inputs()
    out = loss(pc, pr)  # no reference needed
    hand = mean([-(1 - eps) * math.log(sig(beta * (c - r))) - eps * math.log(sig(-beta * (c - r)))
                 for c, r in zip(PC, PR)])
    assert out["loss"].item() == pytest.approx(hand, rel=1e-12)
    assert loss(pc, pr, rc, rr)["loss"].item() == out["loss"].item()
    assert out["rewards/chosen"].item() == pytest.approx(beta * mean(PC), rel=1e-12)
    assert L.get_loss("ref_free").requires_reference is False


def test_ce_is_negative_chosen_logp_and_ignores_rejected_and_reference():
    loss = L.get_loss("ce")
    pc, pr, rc, rr = inputs()
    out = loss(pc, pr)
    assert out["loss"].item() == pytest.approx(-mean(PC), rel=1e-12)
    assert loss(pc, pr - 5.0, rc + 1.0, rr)["loss"].item() == out["loss"].item()
    assert loss.requires_reference is False and loss.needs_kl is False


def test_ce_over_candidates_equals_torch_cross_entropy():
    img, cand = features(4, 6, 1), features(5, 6, 2)
    chosen, rejected = torch.tensor([0, 3, 1, 4]), torch.tensor([2, 2, 0, 1])
    pc, pr, _ = L.pair_logps(img, None, None, 3.0, candidates=cand, chosen_index=chosen, rejected_index=rejected)
    expected = torch.nn.functional.cross_entropy(3.0 * img @ cand.T, chosen)
    assert L.get_loss("ce")(pc, pr)["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_reward_metrics_match_trl_definition():
    beta = 0.5
    out = L.get_loss("dpo", beta=beta)(*[x.requires_grad_() for x in inputs()])
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR)]
    assert out["rewards/chosen"].item() == pytest.approx(mean(chosen), rel=1e-12)
    assert out["rewards/rejected"].item() == pytest.approx(mean(rejected), rel=1e-12)
    assert out["rewards/margins"].item() == pytest.approx(mean(chosen) - mean(rejected), rel=1e-12)
    assert out["rewards/accuracies"].item() == pytest.approx(2 / 3)  # h > 0 for samples 0 and 2
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert out["loss"].requires_grad


def test_forward_rejects_bad_inputs():
    loss = L.get_loss("dpo")
    pc, pr, rc, rr = inputs()
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        loss(pc, pr)
    with pytest.raises(ValueError, match="shape"):
        loss(pc, pr[:2], rc, rr)
    with pytest.raises(ValueError, match="1-D"):
        loss(pc[None], pr[None], rc[None], rr[None])


@pytest.mark.parametrize("name,bad", [("dpo", {"beta": 0.0}), ("dpo", {"label_smoothing": 0.7}),
                                      ("kto", {"desirable_weight": -1.0}), ("ipo", {"beta": float("nan")})])
def test_invalid_hyper_parameter_values_are_rejected(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        L.get_loss(name, **bad)


# ---------------------------------------------------------------- log-probs of the contrastive policy

def test_policy_logps_is_a_normalised_log_softmax_and_stable():
    img, cand = features(3, 5, 3), features(7, 5, 4)
    lp = L.policy_logps(img, cand, 2.0)
    assert torch.allclose(lp.logsumexp(-1), torch.zeros(3, dtype=F64), atol=1e-12)
    assert torch.allclose(lp, torch.log(torch.softmax(2.0 * img @ cand.T, -1)), atol=1e-12)
    assert torch.isfinite(L.policy_logps(img, cand, 1e5)).all()  # no exp overflow at huge scales


def test_pair_logps_batch_candidates():
    img, tw, tl = features(4, 6, 5), features(4, 6, 6), features(4, 6, 7)
    pc, pr, m = L.pair_logps(img, tw, tl, 5.0)
    expected = torch.log_softmax(5.0 * img @ torch.cat([tw, tl]).T, -1)
    assert m.shape == (4, 8) and torch.allclose(m, expected)
    assert torch.equal(pc, expected.diagonal()) and torch.equal(pr, expected[:, 4:].diagonal())


def test_pair_logps_fixed_candidates_and_misuse():
    img, cand = features(3, 6, 8), features(5, 6, 9)
    ci, ri = torch.tensor([4, 0, 2]), torch.tensor([1, 1, 3])
    pc, pr, m = L.pair_logps(img, None, None, 5.0, candidates=cand, chosen_index=ci, rejected_index=ri)
    assert m.shape == (3, 5)
    assert pc.tolist() == [m[0, 4].item(), m[1, 0].item(), m[2, 2].item()]
    assert pr.tolist() == [m[0, 1].item(), m[1, 1].item(), m[2, 3].item()]
    with pytest.raises(ValueError, match="chosen_index"):
        L.pair_logps(img, None, None, 5.0, candidates=cand)
    with pytest.raises(ValueError, match="chosen_features=None"):
        L.pair_logps(img, img, img, 5.0, candidates=cand, chosen_index=ci, rejected_index=ri)
    with pytest.raises(ValueError, match=r"integers in \[0, 5\)"):
        L.pair_logps(img, None, None, 5.0, candidates=cand, chosen_index=torch.tensor([5, 0, 0]), rejected_index=ri)
    with pytest.raises(ValueError, match="batch sizes differ"):
        L.pair_logps(img, img[:2], img, 5.0)


# ---------------------------------------------------------------- paper: Lemma 3.1, Corollary 3.2, Thm 3.3 / Prop 3.4

def lemma_setup(seed=10, n=4, d=8, classes=6):
    """Policy and reference image features, one frozen text tower; y_w / y_l are class prompts."""
    i_theta, i_ref = features(n, d, seed), features(n, d, seed + 1)
    prompts = features(classes, d, seed + 2)  # frozen text tower: the same T for policy and reference
    ci = torch.tensor([0, 1, 2, 3])[:n]
    ri = torch.tensor([5, 4, 0, 1])[:n]
    return i_theta, i_ref, prompts, ci, ri


def both_candidate_sets(i_theta, i_ref, prompts, ci, ri, s):
    """(pc, pr, rc, rr) over (a) the batch captions and (b) the class prompts."""
    tw, tl = prompts[ci], prompts[ri]
    batch = L.pair_logps(i_theta, tw, tl, s)[:2] + L.pair_logps(i_ref, tw, tl, s)[:2]
    fixed = (L.pair_logps(i_theta, None, None, s, candidates=prompts, chosen_index=ci, rejected_index=ri)[:2]
             + L.pair_logps(i_ref, None, None, s, candidates=prompts, chosen_index=ci, rejected_index=ri)[:2])
    return batch, fixed


def test_lemma_3_1_policy_ratio_is_a_feature_inner_product_on_any_candidate_set():
    s = 7.5
    i_theta, i_ref, prompts, ci, ri = lemma_setup()
    closed_form = s * ((i_theta - i_ref) * (prompts[ci] - prompts[ri])).sum(-1)
    batch, fixed = both_candidate_sets(i_theta, i_ref, prompts, ci, ri, s)
    assert torch.allclose(L.policy_ratio(*batch), closed_form, atol=1e-12)
    assert torch.allclose(L.policy_ratio(*fixed), closed_form, atol=1e-12)
    # hence DPO/IPO do not see the candidate set ...
    for name in ("dpo", "ipo"):
        loss = L.get_loss(name)
        assert loss(*batch)["loss"].item() == pytest.approx(loss(*fixed)["loss"].item(), rel=1e-10)
    # ... but KTO does: its log-ratios keep the partition functions
    kto = L.get_loss("kto")
    assert abs(kto(*batch, kl=0.0)["loss"].item() - kto(*fixed, kl=0.0)["loss"].item()) > 1e-3


@pytest.mark.parametrize("name,beta", [("dpo", 0.8), ("ipo", 0.1)])
@pytest.mark.parametrize("candidate_set", ["batch", "fixed"])
def test_corollary_3_2_gradient_wrt_image_features(name, beta, candidate_set):
    s = 4.0
    i_theta, i_ref, prompts, ci, ri = lemma_setup(seed=20)
    i_theta.requires_grad_(True)
    batch, fixed = both_candidate_sets(i_theta, i_ref, prompts, ci, ri, s)
    out = L.get_loss(name, beta=beta)(*(batch if candidate_set == "batch" else fixed))
    (grad,) = torch.autograd.grad(out["loss"], i_theta)
    h = s * ((i_theta.detach() - i_ref) * (prompts[ci] - prompts[ri])).sum(-1)
    w = beta * torch.sigmoid(-beta * h) if name == "dpo" else 2 * (1 / (2 * beta) - h)
    expected = -(w[:, None] * s * (prompts[ci] - prompts[ri])) / len(h)  # 1/B from the batch mean
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.mark.parametrize("name,beta", [("dpo", 1.0), ("ipo", 0.01), ("ipo", 0.5)])
@pytest.mark.parametrize("x1,x2", [(2.0, 0.5), (1.3, 0.9), (0.4, 3.0)])
def test_theorem_3_3_and_proposition_3_4_gradient_ratio(name, beta, x1, x2):
    # x1 = π_θ(y_w|x)/π_ref(y_w|x), x2 = π_θ(y_l|x)/π_ref(y_l|x)
    ref_c, ref_r = t([-1.2]), t([-0.7])
    x = t([x1, x2], grad=True)
    out = L.get_loss(name, beta=beta)(torch.log(x[:1]) + ref_c, torch.log(x[1:]) + ref_r, ref_c, ref_r)
    (g,) = torch.autograd.grad(out["loss"], x)
    assert abs(g[0] / g[1]).item() == pytest.approx(x2 / x1, rel=1e-10)


# ---------------------------------------------------------------- at θ = ref

@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_rewards_vanish_at_reference(name):
    img, tw, tl = features(5, 6, 30), features(5, 6, 31), features(5, 6, 32)
    pc, pr, pm = L.pair_logps(img, tw, tl, 10.0)
    rc, rr, rm = L.pair_logps(img.clone(), tw.clone(), tl.clone(), 10.0)
    loss = L.get_loss(name)
    kwargs = {"kl": L.kto_reference_point_exact(pm, rm)} if loss.needs_kl else {}
    out = loss(pc, pr, rc, rr, **kwargs)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert out[key].item() == 0.0, key
    if name == "dpo":
        assert out["loss"].item() == pytest.approx(math.log(2), rel=1e-12)
    if name == "kto":
        assert out["kl"].item() == 0.0
        assert out["loss"].item() == pytest.approx(0.5, rel=1e-12)  # σ(0) for every term, weights 1


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_regulariser_is_zero_with_zero_gradient_at_reference(direction):
    img, txt = features(4, 6, 40), features(5, 6, 41)
    p_img, p_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    p_scale = torch.tensor(12.0, dtype=F64, requires_grad=True)
    kl = L.kl_regulariser(p_img, p_txt, img, txt, p_scale, 12.0, direction=direction)
    assert kl.item() == pytest.approx(0.0, abs=1e-15)
    for g in torch.autograd.grad(kl, (p_img, p_txt, p_scale)):
        assert torch.allclose(g, torch.zeros_like(g), atol=1e-14)


def test_kl_regulariser_matches_hand_computation_in_both_directions():
    p_img, p_txt = features(2, 3, 50), features(3, 3, 51)
    r_img, r_txt = features(2, 3, 52), features(3, 3, 53)
    sp, sr = 3.0, 5.0

    def softmax_rows(img, txt, s):
        rows = []
        for i in img.tolist():
            logits = [s * sum(a * b for a, b in zip(i, y)) for y in txt.tolist()]
            z = sum(math.exp(v) for v in logits)
            rows.append([math.exp(v) / z for v in logits])
        return rows

    p, q = softmax_rows(p_img, p_txt, sp), softmax_rows(r_img, r_txt, sr)
    forward = mean([sum(a * math.log(a / b) for a, b in zip(pr, qr)) for pr, qr in zip(p, q)])
    reverse = mean([sum(b * math.log(b / a) for a, b in zip(pr, qr)) for pr, qr in zip(p, q)])
    assert L.kl_regulariser(p_img, p_txt, r_img, r_txt, sp, sr).item() == pytest.approx(forward, rel=1e-12)
    got = L.kl_regulariser(p_img, p_txt, r_img, r_txt, sp, sr, direction="reverse").item()
    assert got == pytest.approx(reverse, rel=1e-12)
    assert abs(forward - reverse) > 1e-3
    with pytest.raises(ValueError, match="direction"):
        L.kl_regulariser(p_img, p_txt, r_img, r_txt, sp, sr, direction="both")


def test_total_loss_is_eq_14():
    pref, reg = t(0.7, grad=True), t(0.2, grad=True)
    total = L.total_loss(pref, reg, 0.5)
    assert total.item() == pytest.approx(0.8)
    total.backward()
    assert (pref.grad.item(), reg.grad.item()) == (1.0, 0.5)
    assert L.total_loss(pref, None, 0.5) is pref


# ---------------------------------------------------------------- KTO reference point estimators

def test_kto_kl_logps_rolls_the_chosen_caption_by_one():
    pm, rm = torch.randn(4, 8, dtype=F64), torch.randn(4, 8, dtype=F64)
    pkl, rkl = L.kto_kl_logps(pm, rm)  # batch captions: y_w of row i is column i
    assert pkl.tolist() == [pm[0, 3].item(), pm[1, 0].item(), pm[2, 1].item(), pm[3, 2].item()]
    assert rkl.tolist() == [rm[0, 3].item(), rm[1, 0].item(), rm[2, 1].item(), rm[3, 2].item()]
    pkl, _ = L.kto_kl_logps(pm, rm, chosen_index=torch.tensor([5, 6, 7, 1]))
    assert pkl.tolist() == [pm[0, 1].item(), pm[1, 5].item(), pm[2, 6].item(), pm[3, 7].item()]
    with pytest.raises(ValueError, match="at least 2"):
        L.kto_kl_logps(pm[:1], rm[:1])


def test_kto_reference_point_exact_is_mean_kl_detached_and_clamped():
    pm = torch.log_softmax(torch.randn(3, 5, dtype=F64), -1).requires_grad_()
    rm = torch.log_softmax(torch.randn(3, 5, dtype=F64), -1)
    z = L.kto_reference_point_exact(pm, rm)
    hand = mean([sum(math.exp(a) * (a - b) for a, b in zip(pr, qr)) for pr, qr in zip(pm.tolist(), rm.tolist())])
    assert z.item() == pytest.approx(hand, rel=1e-12)
    assert not z.requires_grad
    # near-identical distributions: rounding never makes z negative (each KL term is >= 0)
    nudged = torch.log_softmax(pm.detach() + 1e-9 * torch.arange(pm.shape[1], dtype=F64), dim=-1)
    assert 0.0 <= L.kto_reference_point_exact(pm.detach(), nudged).item() < 1e-15


# ---------------------------------------------------------------- registry

def test_list_losses_lists_all_builtins_and_get_loss_builds_them():
    assert set(BUILTINS) <= set(L.list_losses())
    for name, cls_name in BUILTINS.items():
        loss = L.get_loss(name)
        assert type(loss).__name__ == cls_name
        assert isinstance(loss, torch.nn.Module)
        assert loss.requires_reference is (name not in ("ref_free", "ce"))
        assert loss.needs_kl is (name == "kto")


def test_paper_defaults():
    assert L.loss_hparams("dpo") == {"beta": 1.0, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
                                     "f_alpha_divergence_coef": 1.0}
    assert L.loss_hparams("ipo") == {"beta": 0.01}
    assert L.loss_hparams("kto") == {"beta": 1.5, "desirable_weight": 1.0, "undesirable_weight": 1.0}


def test_unknown_name_and_hyper_parameter():
    with pytest.raises(ValueError, match=r"unknown loss 'dpoo'; known: aot, .*, ce, .*, dpo, .*, kto, .*sppo_hard"):
        L.get_loss("dpoo")
    with pytest.raises(TypeError, match="'label_smoothing'"):
        L.get_loss("ipo", beta=0.1, label_smoothing=0.1)
    with pytest.raises(TypeError, match="'beta'"):
        L.get_loss("ce", beta=1.0)


def make_dist(root: Path, dist: str, module: str, source: str, entry: str):
    """A minimal installed distribution: a module and a .dist-info declaring our entry-point group."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[{registry.GROUP}]\n{entry}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("po_test_")]:
        del sys.modules[name]


def test_third_party_distribution_adds_an_objective(plugin_path):
    make_dist(plugin_path, "po-test-squared", "po_test_squared", """
        from open_clip_po.losses import PairwiseLoss

        class SquaredLoss(PairwiseLoss):
            def __init__(self, beta=1.0, margin=1.0):
                super().__init__(beta)
                self.margin = margin

            def loss_of_ratio(self, h):
                return (self.margin - self.beta * h) ** 2
        """, "squared = po_test_squared:SquaredLoss")
    assert "squared" in L.list_losses() and set(BUILTINS) <= set(L.list_losses())
    loss = L.get_loss("squared", beta=0.5, margin=2.0)
    assert loss(*inputs())["loss"].item() == pytest.approx(mean([(2.0 - 0.5 * h) ** 2 for h in H]), rel=1e-12)
    with pytest.raises(TypeError, match="'gamma'"):
        L.get_loss("squared", gamma=1.0)


def test_broken_entry_point_names_the_distribution(plugin_path):
    make_dist(plugin_path, "po-test-broken", "po_test_broken", "import no_such_module_here\n",
              "broken = po_test_broken:Loss")
    make_dist(plugin_path, "po-test-notaloss", "po_test_notaloss", "def Loss():\n    return 1\n",
              "notaloss = po_test_notaloss:Loss")
    assert {"broken", "notaloss"} <= set(L.list_losses())
    with pytest.raises(L.LossEntryPointError,
                       match=r"entry point 'broken = po_test_broken:Loss' of distribution 'po-test-broken 0.3'.*"
                             r"ModuleNotFoundError"):
        L.get_loss("broken")
    with pytest.raises(L.LossEntryPointError, match="po-test-notaloss.*not name a torch.nn.Module"):
        L.get_loss("notaloss")
    assert type(L.get_loss("dpo")).__name__ == "DPOLoss"  # one bad plugin does not break the others


def test_conflicting_registrations_are_reported(monkeypatch):
    real = registry.entry_points

    def patched(group):
        return list(real(group=group)) + [EntryPoint("dpo", "somewhere.else:DPO", group)]

    monkeypatch.setattr(registry, "entry_points", patched)
    with pytest.raises(L.LossEntryPointError, match="'dpo' is registered more than once"):
        L.get_loss("dpo")


def test_monkeypatched_entry_point_is_found(monkeypatch):
    real = registry.entry_points

    def patched(group):
        return list(real(group=group)) + [EntryPoint("dpo_alias", "open_clip_po.losses.dpo:DPOLoss", group)]

    monkeypatch.setattr(registry, "entry_points", patched)
    assert "dpo_alias" in L.list_losses()
    assert L.get_loss("dpo_alias", beta=0.7)(*inputs())["loss"].item() == pytest.approx(
        L.get_loss("dpo", beta=0.7)(*inputs())["loss"].item())


# ---------------------------------------------------------------- package hygiene

def test_gather_features_is_identity_without_process_group():
    x = torch.randn(3, 4)
    assert L.gather_features(x) is x and L.world_info() == (0, 1)


def test_losses_package_imports_no_trainer_data_or_open_clip():
    forbidden = ("open_clip", "open_clip_train", "open_clip_po.data")
    root = Path(L.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), f"{path.name} imports {name}"
