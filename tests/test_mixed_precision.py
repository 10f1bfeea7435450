"""A PO step under bf16/fp16 autocast on CPU against the fp32 step: the towers run in low precision, the
similarities, log-probs, rewards and KL in float32 (losses/precision.py)."""
import copy
import math

import pytest
import torch

from open_clip_po.criterion import POCriterion, POSettings
from open_clip_po.head import attach_linear_head, get_linear_head
from open_clip_po.losses import get_loss
from open_clip_po.reference import make_reference

NAMES = ["red", "green", "blue", "black"]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def batch(tiny_model_and_transforms):
    _, _, _, tokenizer = tiny_model_and_transforms
    torch.manual_seed(0)
    prompts = tokenizer([f"a photo of a {n}." for n in NAMES])
    chosen_idx, rejected_idx = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 2, 3, 0, 2, 3])
    return {"images": torch.randn(6, 3, 64, 64), "chosen": prompts[chosen_idx], "rejected": prompts[rejected_idx],
            "reg_images": torch.randn(4, 3, 64, 64), "reg_texts": prompts}


def _step(model, reference, objective, batch, dtype):
    criterion = POCriterion(get_loss(objective), reference, POSettings(reg_lambda=1.0))
    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with context:
        out = criterion(model, batch)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("objective", ["dpo", "ipo", "kto"])
def test_at_the_reference_every_precision_gives_log_2_and_zero_kl_exactly(tiny_model, batch, dtype, objective):
    out = _step(tiny_model, make_reference(copy.deepcopy(tiny_model)), objective, batch, dtype)
    assert out["reg_kl"].dtype == torch.float32 and out["reg_kl"].item() == 0.0
    if objective == "dpo":
        # log 2 exactly as float32 holds it, not to bf16's 3 digits
        assert out["pref_loss"].item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert out["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_linear_head_step_under_autocast_follows_the_fp32_step(tiny_model, batch, dtype):
    # W away from identity, so that the step has a real direction to agree on
    head = attach_linear_head(tiny_model)
    with torch.no_grad():
        head.weight.add_(0.2 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    results = {}
    for name, precision in (("fp32", None), ("low", dtype)):
        head.weight.grad = None
        out = _step(tiny_model, make_reference(is_base_of_head=True), "dpo", batch, precision)
        out["loss"].backward()
        results[name] = (out, get_linear_head(tiny_model).weight.grad.clone())
    (fp32, g32), (low, glow) = results["fp32"], results["low"]
    # Towers in bf16 carry ~3 significant digits (fp16 ~4); features of norm 1 are off by ~1e-2 at most, so at
    # logit scale s the logits move by ~s·1e-2 and the loss by a few 1e-2 relative. The float32 tail keeps the
    # KL non-negative and adds no error of its own.
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert low["loss"].item() == pytest.approx(fp32["loss"].item(), rel=tol)
    assert low["reg_kl"].item() >= 0
    cosine = torch.nn.functional.cosine_similarity(glow.flatten(), g32.flatten(), dim=0).item()
    assert cosine > (0.98 if dtype == torch.bfloat16 else 0.995), cosine
    assert glow.norm().item() == pytest.approx(g32.norm().item(), rel=2 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kl_regulariser_never_goes_negative_near_the_reference(tiny_model, batch, dtype):
    # a policy a hair away from the reference: the regime where low-precision logits made the KL negative
    policy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-4 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        policy.logit_scale.fill_(math.log(100))
    reference = make_reference(copy.deepcopy(tiny_model))
    reference.model.logit_scale.data.fill_(math.log(100))
    for seed in range(5):
        torch.manual_seed(seed)
        b = {**batch, "reg_images": torch.randn(8, 3, 64, 64), "reg_texts": batch["reg_texts"][torch.arange(8) % 4]}
        assert _step(policy, reference, "dpo", b, dtype)["reg_kl"].item() >= 0
