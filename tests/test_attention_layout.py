"""The frozen reference's self-attention under autocast runs the policy's GEMMs (attention_layout): no L-fold
expansion of the in-projection weight, the policy's features bit for bit at θ = θ_ref, nothing else changed."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from open_clip_po.towers.attention_layout import contiguous_attention_under_autocast
from open_clip_po.reference import make_reference


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def inputs(tiny_model_and_transforms):
    _, _, _, tokenizer = tiny_model_and_transforms
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), tokenizer(["a red", "a blue cat"])


def _encode(model, images, texts, dtype, grad):
    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with context, torch.set_grad_enabled(grad):
        return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)


def _bmm_calls(model, images, texts, dtype):
    with OpCounter() as counter:
        _encode(model, images, texts, dtype, grad=False)
    return counter.counts.get(torch.ops.aten.bmm.default, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_reference_runs_no_expanded_weight_gemm(tiny_model, inputs, dtype):
    plain = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    reference = make_reference(copy.deepcopy(tiny_model)).model
    blocks = len(tiny_model.visual.transformer.resblocks) + len(tiny_model.transformer.resblocks)
    # a plain frozen copy expands the in-projection weight once per self-attention layer; the reference does not
    assert _bmm_calls(plain, *inputs, dtype) == blocks
    assert _bmm_calls(reference, *inputs, dtype) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_at_the_reference_its_features_are_the_policys_bit_for_bit(tiny_model, inputs, dtype):
    reference = make_reference(copy.deepcopy(tiny_model)).model
    policy = tiny_model.eval()
    ref_image, ref_text = _encode(reference, *inputs, dtype, grad=False)
    pol_image, pol_text = _encode(policy, *inputs, dtype, grad=True)
    assert pol_image.requires_grad  # the policy took its own, grad-enabled path
    assert torch.equal(ref_image, pol_image.detach()) and torch.equal(ref_text, pol_text.detach())


def test_without_autocast_nothing_changes(tiny_model, inputs):
    plain = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    rebound = copy.deepcopy(plain)
    assert contiguous_attention_under_autocast(rebound) == contiguous_attention_under_autocast(rebound) > 0
    for a, b in zip(_encode(plain, *inputs, None, grad=False), _encode(rebound, *inputs, None, grad=False)):
        assert torch.equal(a, b)
    _encode(rebound, *inputs, torch.bfloat16, grad=False)
    attns = [m for m in rebound.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attns and all(m.batch_first for m in attns)  # the layout switch is undone after each call
    assert list(rebound.state_dict()) == list(plain.state_dict())


def test_linear_head_mode_gives_the_frozen_backbone_the_same_layout(inputs):
    """In linear-head mode the reference is the policy's own backbone, run without grad: as the run builds it, its
    attention takes the contiguous path under autocast (no expanded-weight GEMM), for the same features."""
    from types import SimpleNamespace

    import open_clip

    from open_clip_po.trainer.model_setup import ModelSetup

    args = SimpleNamespace(po_ref_cache=None, po_linear_head=True, po_head_towers="both", po_head_param="log",
                           po_full_text_context=False)
    setup = ModelSetup(lambda: args, open_clip.create_model_and_transforms)
    torch.manual_seed(0)
    model = setup.create_model_and_transforms("po-tiny", output_dict=True)[0].eval()
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m.__dict__.pop("forward", None)  # the head's own wrappers live on encode_*, not on forward
    with OpCounter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        policy, reference = setup.reference.step_features(model, *inputs)
    assert counter.counts.get(torch.ops.aten.bmm.default, 0) == 0
    with OpCounter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        plain_policy, _ = setup.reference.step_features(plain, *inputs)
    assert counter.counts.get(torch.ops.aten.bmm.default, 0) > 0  # the unrebound backbone expands the weight
    torch.testing.assert_close(policy.image, plain_policy.image)  # the same features, up to bf16 rounding
