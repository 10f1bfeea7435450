"""Weighted mixtures of objectives (build_objective) and the command-line parsers."""
import math

import pytest
import torch

from open_clip_po import losses as L

F64 = torch.float64


def inputs(seed=0, n=5, grad=False):
    g = torch.Generator().manual_seed(seed)
    policy = torch.log_softmax(2 * torch.randn(n, 2 * n, generator=g, dtype=F64), dim=-1)
    ref = torch.log_softmax(2 * torch.randn(n, 2 * n, generator=g, dtype=F64), dim=-1)
    idx = torch.arange(n)
    pc, pr = policy[idx, idx].clone(), policy[idx, n + idx].clone()
    if grad:
        pc.requires_grad_(), pr.requires_grad_()
    return pc, pr, ref[idx, idx], ref[idx, n + idx]


def test_single_name_is_exactly_get_loss():
    built = L.build_objective("dpo", None, {"beta": 0.4, "label_smoothing": 0.1})
    assert type(built).__name__ == "DPOLoss" and built.hparams() == L.get_loss(
        "dpo", beta=0.4, label_smoothing=0.1).hparams()
    assert type(L.build_objective("kto", [1.0], {})).__name__ == "KTOLoss"
    assert L.build_objective("dpo", None, {"dpo.beta": 0.3}).beta == 0.3
    with pytest.raises(TypeError, match="loss 'ipo' has no hyper-parameter 'label_smoothing'"):
        L.build_objective("ipo", None, {"label_smoothing": 0.1})


def test_rpo_is_dpo_plus_alpha_times_ce_with_each_term_logged():
    alpha, beta = 0.3, 0.5
    rpo = L.build_objective("dpo,ce", [1.0, alpha], {"beta": beta})
    assert isinstance(rpo, L.MixtureLoss) and rpo.requires_reference and not rpo.needs_kl
    pc, pr, rc, rr = inputs(grad=True)
    out = rpo(pc, pr, rc, rr)
    dpo = L.get_loss("dpo", beta=beta)(pc, pr, rc, rr)
    ce = L.get_loss("ce")(pc, pr, rc, rr)
    assert out["loss"].item() == pytest.approx((dpo["loss"] + alpha * ce["loss"]).item(), rel=1e-12)
    assert out["dpo/loss"].item() == pytest.approx(dpo["loss"].item(), rel=1e-12)
    assert out["ce/loss"].item() == pytest.approx(ce["loss"].item(), rel=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert out[f"dpo/{key}"].item() == pytest.approx(dpo[key].item(), rel=1e-12)
        assert out[key].item() == pytest.approx(dpo[key].item(), rel=1e-12)  # the leading term, unprefixed
        assert f"ce/{key}" in out
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    # the gradient is that of the weighted sum
    grad = torch.autograd.grad(out["loss"], pc)[0]
    want = torch.autograd.grad(dpo["loss"] + alpha * ce["loss"], pc)[0]
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=0)


def test_hyper_parameters_go_to_the_terms_that_take_them():
    mix = L.build_objective("dpo,discopop,ce", [1, 1, 0.1],
                            {"beta": 0.2, "discopop_tau": 0.3, "label_smoothing": 0.1, "dpo.beta": 0.7})
    dpo, discopop, ce = mix.terms.values()
    assert dpo.hparams()["beta"] == 0.7 and dpo.label_smoothing == 0.1  # scoped beta wins for dpo
    assert discopop.hparams() == {"beta": 0.2, "discopop_tau": 0.3}
    assert ce.hparams() == {}
    with pytest.raises(TypeError, match="'simpo_gamma' is taken by none of the objectives dpo, ce"):
        L.build_objective("dpo,ce", None, {"simpo_gamma": 1.0})
    with pytest.raises(TypeError, match="'kto.beta' names objective 'kto', which is not in dpo, ce"):
        L.build_objective("dpo,ce", None, {"kto.beta": 1.0})
    with pytest.raises(TypeError, match="loss 'ce' has no hyper-parameter 'beta'"):
        L.build_objective("dpo,ce", None, {"ce.beta": 1.0})


@pytest.mark.parametrize("weights,message", [
    ([1.0], "got 1 loss weights for 2 objectives"),
    ([1.0, 0.1, 2.0], "got 3 loss weights for 2 objectives"),
    ([1.0, -0.1], "finite numbers >= 0"),
    ([1.0, math.inf], "finite numbers >= 0"),
    ([math.nan, 1.0], "finite numbers >= 0"),
    ([0.0, 0.0], "all 0"),
])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        L.build_objective("dpo,ce", weights, {})


@pytest.mark.parametrize("spec", ["", "dpo,", "dpo,,ce", "dpo,dpo"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match="objective spec"):
        L.build_objective(spec)


def test_unknown_name_in_a_mixture_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'; known: aot"):
        L.build_objective("dpoo,ce")


def test_mixture_with_kto_routes_its_reference_point_and_flags_needs_kl():
    mix = L.build_objective("kto,nca_pair", [0.5, 2.0], {"beta": 0.8})
    assert mix.needs_kl and mix.requires_reference
    pc, pr, rc, rr = inputs(seed=2)
    pkl, rkl = inputs(seed=3)[:2]
    out = mix(pc, pr, rc, rr, policy_kl_logps=pkl, ref_kl_logps=rkl)
    kto = L.get_loss("kto", beta=0.8)(pc, pr, rc, rr, policy_kl_logps=pkl, ref_kl_logps=rkl)
    nca = L.get_loss("nca_pair", beta=0.8)(pc, pr, rc, rr)
    assert out["loss"].item() == pytest.approx(0.5 * kto["loss"].item() + 2.0 * nca["loss"].item(), rel=1e-12)
    assert out["kto/kl"].item() == pytest.approx(kto["kl"].item()) and out["kl"].item() == out["kto/kl"].item()
    with pytest.raises(TypeError, match="no objective of the mixture dpo, ce takes 'policy_kl_logps'"):
        L.build_objective("dpo,ce", [1, 1])(pc, pr, rc, rr, policy_kl_logps=pkl)


def test_reference_free_mixture_needs_no_reference():
    mix = L.build_objective("simpo,ce", [1.0, 0.5])
    assert mix.requires_reference is False
    pc, pr, _, _ = inputs(seed=4)
    out = mix(pc, pr)
    want = L.get_loss("simpo")(pc, pr)["loss"] + 0.5 * L.get_loss("ce")(pc, pr)["loss"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-12)


def test_bco_baseline_lives_in_the_mixture_state_dict():
    mix = L.build_objective("dpo,bco_pair", [1, 1])
    mix(*inputs(seed=5))
    state = mix.state_dict()
    assert set(state) == {"terms.bco_pair.running_mean", "terms.bco_pair.running_var", "terms.bco_pair.running_count"}
    assert state["terms.bco_pair.running_count"].item() == pytest.approx(1.0)


def test_parse_hparams_types_and_errors():
    parsed = L.parse_hparams(["beta=0.1,label_smoothing=0", "f_divergence_type=alpha_divergence",
                              "dpo.f_alpha_divergence_coef=1e-1", "flag=True", "steps=-3"])
    assert parsed == {"beta": 0.1, "label_smoothing": 0, "f_divergence_type": "alpha_divergence",
                      "dpo.f_alpha_divergence_coef": 0.1, "flag": True, "steps": -3}
    assert isinstance(parsed["label_smoothing"], int) and isinstance(parsed["beta"], float)
    assert L.parse_hparams("beta = 2") == {"beta": 2}
    for bad in ("beta", "beta=", "=1", "2beta=1", "a.b.c=1"):
        with pytest.raises(ValueError, match="expected NAME=VALUE"):
            L.parse_hparams(bad)
    with pytest.raises(ValueError, match="'beta' given more than once"):
        L.parse_hparams(["beta=1", "beta=2"])


def test_parse_weights_then_build():
    assert L.parse_weights("1,0.1") == [1.0, 0.1]
    with pytest.raises(ValueError, match="comma-separated numbers"):
        L.parse_weights("1,a")
    mix = L.build_objective("dpo,ce", L.parse_weights("1,0.25"), L.parse_hparams("beta=0.5"))
    assert mix.weights == (1.0, 0.25) and mix.terms["dpo"].beta == 0.5
