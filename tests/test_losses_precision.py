"""Float32 numerics under autocast: logits, log-softmaxes, rewards, the KL and KTO's z never in bf16/fp16."""
import math

import pytest
import torch
import torch.nn.functional as F

from open_clip_po import losses as L

torch.set_num_threads(1)
LOW = [torch.bfloat16, torch.float16]
SCALE = torch.tensor(100.0)


def unit(n, d, g):
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def towers_output(dtype, seed=0, n=8, d=16):
    """Features as a bf16/fp16 forward hands them over: a linear tower under autocast, L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    tower = torch.nn.Linear(d, d)
    with torch.no_grad():
        tower.weight.copy_(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))
    x = [torch.randn(n, d, generator=g) for _ in range(3)]  # image, y_w, y_l inputs
    with torch.autocast("cpu", dtype=dtype):
        feats = [F.normalize(tower(v), dim=-1) for v in x]
    assert all(f.dtype == dtype for f in feats)
    return feats


def near_identical(seed, noise=1e-4, n=16, d=32):
    """Reference features and a policy a hair away from them (the second step of a fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    ref_img, ref_txt = unit(n, d, g), unit(n, d, g)
    img = F.normalize(ref_img + noise * torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(ref_txt + noise * torch.randn(n, d, generator=g), dim=-1)
    return img, txt, ref_img, ref_txt


@pytest.mark.parametrize("dtype", LOW)
def test_pair_logps_under_autocast_equal_float32_on_the_upcast_features(dtype):
    img, tw, tl = towers_output(dtype)
    with torch.autocast("cpu", dtype=dtype):
        pc, pr, matrix = L.pair_logps(img, tw, tl, SCALE.to(dtype))
    want = L.pair_logps(img.float(), tw.float(), tl.float(), SCALE.to(dtype).float())
    assert matrix.dtype == torch.float32
    for got, exp in zip((pc, pr, matrix), want):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
    # what autocast alone would give is off by far more: the comparison has teeth
    with torch.autocast("cpu", dtype=dtype):
        naive = torch.log_softmax(SCALE * img @ torch.cat([tw, tl]).T, dim=-1)
    assert (naive.float() - want[2]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", LOW)
def test_objective_gradients_reach_low_precision_features(dtype):
    img, tw, tl = (f.detach().requires_grad_() for f in towers_output(dtype, seed=1))
    ref = [f.detach() for f in towers_output(dtype, seed=2)]
    with torch.autocast("cpu", dtype=dtype):
        pc, pr, _ = L.pair_logps(img, tw, tl, SCALE)
        rc, rr, _ = L.pair_logps(*ref, SCALE)
        out = L.build_objective("dpo,ce", [1, 0.1])(pc, pr, rc, rr)
    assert out["loss"].dtype == torch.float32 and out["rewards/margins"].dtype == torch.float32
    out["loss"].backward()
    assert img.grad.dtype == dtype and torch.isfinite(img.grad.float()).all() and img.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", LOW)
def test_kl_regulariser_under_autocast_equals_float32_and_is_never_negative(dtype):
    feats = near_identical(seed=5)
    with torch.autocast("cpu", dtype=dtype):
        kl = L.kl_regulariser(*feats, SCALE, SCALE)
        # the formula this package used before: similarities, log-softmax and KL in the autocast dtype
        p = torch.log_softmax(SCALE * feats[0] @ feats[1].T, dim=-1)
        q = torch.log_softmax(SCALE * feats[2] @ feats[3].T, dim=-1)
        old = (p.exp() * (p - q)).sum(-1).mean()
    assert old.item() < 0  # the case this test is about: a KL that came out negative
    want = L.kl_regulariser(*feats, SCALE, SCALE)
    assert kl.dtype == torch.float32 and kl.item() > 0
    torch.testing.assert_close(kl, want, rtol=1e-6, atol=0)


def test_categorical_kl_rows_are_never_negative_even_in_float32():
    for seed in range(5):
        img, txt, ref_img, ref_txt = near_identical(seed, noise=1e-6)
        p, q = L.policy_logps(img, txt, SCALE), L.policy_logps(ref_img, ref_txt, SCALE)
        old = (p.exp() * (p - q)).sum(-1)
        assert (old < 0).any()  # Σ p (log p − log q) rounds below 0 on some rows
        assert (L.categorical_kl(p, q) >= 0).all() and (L.categorical_kl(q, p) >= 0).all()
        exact = L.categorical_kl(p.double(), q.double())
        torch.testing.assert_close(L.categorical_kl(p, q).double(), exact, rtol=0, atol=1e-7)


def test_categorical_kl_gradient_is_the_kl_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1)
    p = torch.log_softmax(logits, dim=-1)
    ours = torch.autograd.grad(L.categorical_kl(p, q).sum(), logits, retain_graph=True)[0]
    textbook = torch.autograd.grad((p.exp() * (p - q)).sum(), logits)[0]
    torch.testing.assert_close(ours, textbook, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_theta_equals_ref_gives_log_2_and_zero_kl_in_every_precision(dtype):
    img, tw, tl = towers_output(torch.bfloat16 if dtype == torch.float32 else dtype, seed=3)
    img, tw, tl = (x.to(dtype) for x in (img, tw, tl))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        pc, pr, pm = L.pair_logps(img, tw, tl, SCALE)
        rc, rr, rm = L.pair_logps(img, tw, tl, SCALE)
        dpo = L.get_loss("dpo")(pc, pr, rc, rr)
        kl = L.kl_regulariser(img, tw, img, tw, SCALE, SCALE)
        z = L.kto_reference_point_exact(pm, rm)
        kto = L.get_loss("kto", beta=1.5)(pc, pr, rc, rr, kl=z)
    assert dpo["loss"].item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert dpo["rewards/margins"].item() == 0.0
    assert kl.item() == 0.0 and z.item() == 0.0
    assert kto["loss"].item() == 0.5 and kto["kl"].dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW)
def test_kto_reference_point_is_float32(dtype):
    img, tw, tl = towers_output(dtype, seed=4)
    ref = towers_output(dtype, seed=5)
    with torch.autocast("cpu", dtype=dtype):
        _, _, pm = L.pair_logps(img, tw, tl, SCALE)
        _, _, rm = L.pair_logps(*ref, SCALE)
        pkl, rkl = L.kto_kl_logps(pm, rm)
        out = L.get_loss("kto")(pm[:, 0], pm[:, 1], rm[:, 0], rm[:, 1], policy_kl_logps=pkl.to(dtype),
                                ref_kl_logps=rkl.to(dtype))
        z = L.kto_reference_point_exact(pm, rm)
    assert z.dtype == torch.float32 and out["kl"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    want = L.kto_reference_point_exact(*(L.pair_logps(*(f.float() for f in fs), SCALE)[2]
                                         for fs in ((img, tw, tl), ref)))
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-8)


def test_categorical_kl_of_far_apart_distributions_is_finite_and_exact():
    # a large logit scale on unrelated features: log(q/p) beyond -88, where e^{−d} overflows float32
    g = torch.Generator().manual_seed(6)
    img, txt, ref_img, ref_txt = (unit(8, 16, g).requires_grad_() for _ in range(4))
    p, q = L.policy_logps(img, txt, 3 * SCALE), L.policy_logps(ref_img, ref_txt, 3 * SCALE)
    assert (p - q).min() < -89
    kl = L.categorical_kl(p, q)
    textbook = (p.double().exp() * (p.double() - q.double())).sum(-1)
    torch.testing.assert_close(kl.double(), textbook, rtol=1e-5, atol=1e-6)
    kl.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (img, txt, ref_img, ref_txt))
