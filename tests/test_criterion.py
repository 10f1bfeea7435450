"""POCriterion wiring (paper Algorithm 1): one policy forward, the reference, candidates, L_pref + λ L_reg."""
import copy
import math

import pytest
import torch

from open_clip_po.criterion import POCriterion, POSettings, match_prompts
from open_clip_po.head import attach_linear_head
from open_clip_po.losses import get_loss
from open_clip_po.reference import make_reference

NAMES = ["red", "green", "blue", "black"]


@pytest.fixture
def batch(tiny_model_and_transforms):
    _, _, _, tokenizer = tiny_model_and_transforms
    torch.manual_seed(0)
    prompts = tokenizer([f"a photo of a {n}." for n in NAMES])
    chosen_idx, rejected_idx = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 0, 2])
    return {"images": torch.randn(5, 3, 64, 64), "chosen": prompts[chosen_idx], "rejected": prompts[rejected_idx],
            "reg_images": torch.randn(3, 3, 64, 64), "reg_texts": prompts[:3]}, prompts


def perturbed(model, seed=1, scale=0.05):
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return policy


def test_at_the_reference_dpo_is_log_2_and_the_regulariser_zero(tiny_model, batch):
    b, _ = batch
    crit = POCriterion(get_loss("dpo"), make_reference(copy.deepcopy(tiny_model)), POSettings(reg_lambda=1.0))
    out = crit(tiny_model, b)
    assert out["pref_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["reg_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_is_the_same_over_batch_and_class_candidates_but_kto_is_not(tiny_model, batch):
    b, prompts = batch
    policy, ref = perturbed(tiny_model), make_reference(copy.deepcopy(tiny_model))
    by = {}
    for candidates in ("batch", "classes"):
        for name in ("dpo", "kto"):
            crit = POCriterion(get_loss(name), ref, POSettings(reg_lambda=0.0, candidates=candidates,
                                                             kto_kl="exact"), prompt_tokens=prompts)
            by[name, candidates] = crit(policy, b)["loss"].item()
    assert by["dpo", "batch"] == pytest.approx(by["dpo", "classes"], abs=1e-5)  # Lemma 3.1
    assert by["kto", "batch"] != pytest.approx(by["kto", "classes"], abs=1e-5)
    assert by["dpo", "batch"] != pytest.approx(math.log(2), abs=1e-4)


def test_total_is_pref_plus_lambda_times_kl(tiny_model, batch):
    b, _ = batch
    policy, ref = perturbed(tiny_model), make_reference(copy.deepcopy(tiny_model))
    out = POCriterion(get_loss("ipo", beta=0.1), ref, POSettings(reg_lambda=0.25))(policy, b)
    assert out["reg_kl"].item() > 0
    assert out["loss"].item() == pytest.approx(out["pref_loss"].item() + 0.25 * out["reg_kl"].item(), rel=1e-5)


def test_gradients_reach_the_policy_only(tiny_model, batch):
    b, _ = batch
    policy, ref = perturbed(tiny_model), make_reference(copy.deepcopy(tiny_model))
    POCriterion(get_loss("dpo"), ref, POSettings())(policy, b)["loss"].backward()
    assert policy.visual.conv1.weight.grad is not None and policy.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ref.model.parameters())


def test_shared_text_reference_uses_the_policy_text_features(tiny_model, batch):
    b, _ = batch
    policy = perturbed(tiny_model)
    shared = make_reference(copy.deepcopy(tiny_model), shares_text=True)
    text = policy.encode_text(b["chosen"], normalize=True)
    _, ref_text, _ = shared.features(b["images"], b["chosen"], policy_text_features=text)
    torch.testing.assert_close(ref_text, text)
    _, own_text, _ = make_reference(copy.deepcopy(tiny_model)).features(b["images"], b["chosen"], policy_text_features=text)
    assert not torch.allclose(own_text, text)


def test_linear_head_reference_is_the_backbone_without_w(tiny_model, batch):
    b, _ = batch
    head = attach_linear_head(tiny_model)
    crit = POCriterion(get_loss("dpo"), make_reference(is_base_of_head=True), POSettings(reg_lambda=1.0))
    out = crit(tiny_model, b)  # W = I: policy = reference
    assert out["pref_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        head.weight.add_(0.3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    out = crit(tiny_model, b)
    out["loss"].backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert tiny_model.visual.conv1.weight.grad is None  # the towers saw no gradient


def test_captions_outside_the_class_prompts_are_a_clear_error(tiny_model, batch, tiny_model_and_transforms):
    b, prompts = batch
    tokenizer = tiny_model_and_transforms[3]
    b = {**b, "rejected": tokenizer(["a photo of a dog."] * 5)}
    crit = POCriterion(get_loss("dpo"), make_reference(copy.deepcopy(tiny_model)), POSettings(candidates="classes"),
                       prompt_tokens=prompts)
    with pytest.raises(ValueError, match=r"5 y_l caption\(s\) in the batch are not one of the class prompts"):
        crit(tiny_model, b)
    torch.testing.assert_close(match_prompts(prompts[[2, 0]], prompts, "y_w"), torch.tensor([2, 0]))


def test_repeated_captions_are_encoded_once_with_the_same_loss_and_gradients(tiny_model, batch):
    from open_clip_po.losses import pair_logps

    b, _ = batch  # 5 y_w and 5 y_l drawn from 4 prompts: captions repeat
    policy, ref_model = perturbed(tiny_model), copy.deepcopy(tiny_model).eval()
    seen = []
    policy.encode_text = (lambda real: (lambda text, normalize=False: seen.append(text.shape[0])
                                         or real(text, normalize=normalize)))(policy.encode_text)
    crit = POCriterion(get_loss("dpo"), make_reference(ref_model), POSettings(reg_lambda=0.0))
    crit(policy, b)["loss"].backward()
    assert seen == [4]  # 10 captions, 4 distinct
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    # by hand, every caption encoded
    policy.zero_grad()
    del policy.encode_text
    texts = torch.cat([b["chosen"], b["rejected"]])
    out = policy(b["images"], texts)
    with torch.no_grad():
        ref = ref_model(b["images"], texts)
    pc, pr, _ = pair_logps(out["image_features"], out["text_features"][:5], out["text_features"][5:],
                           out["logit_scale"])
    rc, rr, _ = pair_logps(ref["image_features"], ref["text_features"][:5], ref["text_features"][5:],
                           ref["logit_scale"])
    get_loss("dpo")(pc, pr, rc, rr)["loss"].backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(policy.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
