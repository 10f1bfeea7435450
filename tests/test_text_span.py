"""A causal, argmax-pooled text tower run over the batch's caption span (text_span): open_clip's own features and
gradients to float rounding, at a fraction of the positions; every other tower untouched."""
import copy
import logging
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import open_clip
import open_clip_po  # noqa: F401  (registers po-tiny)
from open_clip.model import CLIP, CustomTextCLIP
from open_clip_po.criterion import POCriterion, POSettings
from open_clip_po.head import attach_linear_head
from open_clip_po.losses import get_loss
from open_clip_po.reference import make_reference
from open_clip_po.towers.text_span import (caption_span, configure_text_span, run_text_over_caption_span,
                                    runs_text_over_caption_span)

# mixed lengths in one batch (3–8 tokens with SOT and EOT): the longest makes the span 8 positions
CAPTIONS = ["a dog", "a photo of a dog.", "The man is cooking", "cat"]
SPAN = 8


@pytest.fixture(scope="module")
def vit_b_32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None, output_dict=True).eval()  # random init


@pytest.fixture(scope="module")
def tokens():
    return {n: open_clip.get_tokenizer(m)(CAPTIONS) for n, m in (("po-tiny", "po-tiny"), ("ViT-B-32", "ViT-B-32"))}


def custom_text_po_tiny(**text_cfg):
    config = open_clip.get_model_config("po-tiny")
    torch.manual_seed(0)
    return CustomTextCLIP(config["embed_dim"], config["vision_cfg"], {**config["text_cfg"], **text_cfg},
                          output_dict=True).eval()


def encoder_of(model):
    """What the span rebinds: ``encode_text`` of a CLIP, ``text.forward`` of a CustomTextCLIP."""
    return model if isinstance(model, CLIP) else model.text


def full_context(model, text, normalize=False):
    """open_clip's own text encoder, whatever is bound on the instance."""
    if isinstance(model, CLIP):
        return type(model).encode_text(model, text, normalize=normalize)
    features = type(model.text).forward(model.text, text)
    return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def positions_seen(model, text):
    """Sequence lengths the text transformer runs over for one encode_text call."""
    seen = []
    handle = encoder_of(model).transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        model.encode_text(text)
    finally:
        handle.remove()
    return seen


def rebound_copy(model):
    spanned = copy.deepcopy(model)
    assert run_text_over_caption_span(spanned) is None
    return spanned


def assert_same_gradient(got, expected, name):
    """Equal to float rounding, relative to the gradient's own scale (summation order differs with the shape)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)


def models(tiny_model, vit_b_32):
    return {"po-tiny": tiny_model, "ViT-B-32": vit_b_32}


# -- the span ---------------------------------------------------------------------------------------------------

def test_caption_span_is_the_last_pooled_position_rounded_up_to_8_and_capped():
    text = torch.zeros(3, 20, dtype=torch.long)
    text[0, :3] = torch.tensor([49406, 5, 49407])
    assert caption_span(text) == 8
    text[1, 8] = 49407  # pooled position 8: 9 positions → 16
    assert caption_span(text) == 16
    assert caption_span(text[:, :12]) == 12  # capped at the row length
    text[2, 19] = 49407
    assert caption_span(text) == 20


@pytest.mark.parametrize("name", ["po-tiny", "ViT-B-32"])
def test_features_equal_open_clips_full_context(tiny_model, vit_b_32, tokens, name):
    model, text = models(tiny_model, vit_b_32)[name], tokens[name]
    assert int(text.argmax(-1).max()) < SPAN and len(set(text.argmax(-1).tolist())) > 2  # mixed lengths
    spanned = rebound_copy(model)
    with torch.no_grad():
        expected = full_context(model, text, normalize=True)
        got = spanned.encode_text(text, normalize=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert positions_seen(spanned, text) == [SPAN]
    assert positions_seen(model, text) == [text.shape[1]]


def test_the_span_cuts_the_text_flops_of_vit_b_32(vit_b_32, tokens):
    text = tokens["ViT-B-32"]
    spanned = rebound_copy(vit_b_32)
    counts = []
    for model in (vit_b_32, spanned):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.encode_text(text)
        counts.append(counter.get_total_flops())
    assert counts[1] < 0.15 * counts[0]  # 8 of 77 positions (attention scores shrink quadratically)


@pytest.mark.parametrize("name", ["po-tiny", "ViT-B-32"])
def test_gradients_equal_open_clips_full_context(tiny_model, vit_b_32, tokens, name):
    model, text = models(tiny_model, vit_b_32)[name], tokens[name]
    full, spanned = copy.deepcopy(model), rebound_copy(model)
    weights = torch.randn(len(CAPTIONS), model.text_projection.shape[1], generator=torch.Generator().manual_seed(0))
    (full_context(full, text, normalize=True) * weights).sum().backward()
    (spanned.encode_text(text, normalize=True) * weights).sum().backward()
    grads = {n: p.grad for n, p in full.named_parameters() if p.grad is not None}
    spanned_grads = {n: p.grad for n, p in spanned.named_parameters() if p.grad is not None}
    assert set(grads) == set(spanned_grads) and "positional_embedding" in grads
    for n, g in grads.items():
        assert_same_gradient(spanned_grads[n], g, n)
    last = int(text.argmax(-1).max())
    for g in (grads["positional_embedding"], spanned_grads["positional_embedding"]):
        assert g[:last + 1].abs().sum() > 0 and torch.equal(g[last + 1:], torch.zeros_like(g[last + 1:]))


def test_under_bf16_autocast_the_same_features_to_bf16_rounding(tiny_model, tokens):
    text = tokens["po-tiny"]
    spanned = rebound_copy(tiny_model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = full_context(tiny_model, text, normalize=True)
        got = spanned.encode_text(text, normalize=True)
        assert positions_seen(spanned, text) == [SPAN]
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2e-2)


def test_bf16_weights_cast_as_open_clip_casts_them(tokens):
    torch.manual_seed(0)
    model = open_clip.create_model("po-tiny", precision="bf16", output_dict=True).eval()
    text = tokens["po-tiny"]
    spanned = rebound_copy(model)
    with torch.no_grad():
        expected, got = full_context(model, text), spanned.encode_text(text)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("proj_bias", [False, True])  # text_projection a Parameter, or an nn.Linear
def test_a_custom_text_clips_text_transformer_runs_the_span(tokens, proj_bias):
    model = custom_text_po_tiny(proj_bias=proj_bias)
    assert isinstance(model.text.text_projection, torch.nn.Linear) == proj_bias
    text = tokens["po-tiny"]
    spanned = rebound_copy(model)
    assert "forward" in vars(spanned.text) and "encode_text" not in vars(spanned)
    expected = full_context(model, text, normalize=True)
    got = spanned.encode_text(text, normalize=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert positions_seen(spanned, text) == [SPAN]
    got.sum().backward()
    assert spanned.text.positional_embedding.grad.shape == model.text.positional_embedding.shape


def test_a_full_span_runs_open_clips_own_method(tiny_model):
    spanned = rebound_copy(tiny_model)
    text = torch.zeros(2, tiny_model.context_length, dtype=torch.long)
    text[:, 0], text[0, 4], text[1, 10] = 49406, 49407, 49407  # pooled at 10: 11 positions → 16 = the context
    with mock.patch.object(CLIP, "encode_text", autospec=True, side_effect=CLIP.encode_text) as own:
        spanned.encode_text(text)
    assert own.call_count == 1


# -- what is left alone -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text_cfg, why", [
    ({"pool_type": "last"}, "its text pooling is 'last', not 'argmax'"),
    ({"pool_type": "first"}, "its text pooling is 'first', not 'argmax'"),
    ({"no_causal_mask": True}, "its text attention is bidirectional (no causal mask)"),
    ({"embed_cls": True}, "its text tower appends a class token"),
    ({"no_causal_mask": True, "use_pad_mask": True}, "its text tower masks padding"),  # (set on the tower below)
    ({"output_tokens": True}, "its text tower returns token features"),
])
def test_other_text_towers_are_left_untouched(text_cfg, why):
    text_cfg = dict(text_cfg)
    use_pad_mask = text_cfg.pop("use_pad_mask", False)  # open_clip 3.3.0's config does not pass it on
    model = custom_text_po_tiny(**text_cfg)
    model.text.use_pad_mask = use_pad_mask
    assert run_text_over_caption_span(model) == why
    assert "forward" not in vars(model.text) and "encode_text" not in vars(model)
    assert not runs_text_over_caption_span(model)


def test_a_clip_without_causal_mask_or_argmax_pooling_and_other_models_are_left_untouched():
    config = open_clip.get_model_config("po-tiny")
    for text_cfg, why in (({"pool_type": "eos"}, "its text pooling is 'eos', not 'argmax'"),
                          ({"no_causal_mask": True}, "its text attention is bidirectional (no causal mask)")):
        model = CLIP(config["embed_dim"], config["vision_cfg"], {**config["text_cfg"], **text_cfg})
        assert run_text_over_caption_span(model) == why and "encode_text" not in vars(model)
    model = CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"])
    model.attn_mask.fill_(0)
    assert run_text_over_caption_span(model) == "its text attention mask is not the causal one"
    assert run_text_over_caption_span(torch.nn.Linear(2, 2)) == \
        "Linear is neither open_clip's CLIP nor a CustomTextCLIP"


def test_idempotent_and_after_a_head_it_says_why(tiny_model):
    headed = copy.deepcopy(tiny_model)
    assert run_text_over_caption_span(tiny_model) is None
    bound = tiny_model.encode_text
    assert run_text_over_caption_span(tiny_model) is None and tiny_model.encode_text == bound
    attach_linear_head(headed)
    assert run_text_over_caption_span(headed) == ("its encode_text is already replaced on the instance (e.g. by a "
                                                  "linear head; apply this first)")


# -- deepcopy, the reference, the head --------------------------------------------------------------------------

def test_the_rebinding_survives_deepcopy(tiny_model, tokens):
    text = tokens["po-tiny"]
    spanned = rebound_copy(tiny_model)
    clone = copy.deepcopy(spanned)
    assert runs_text_over_caption_span(clone) and clone.encode_text.__self__ is clone
    assert positions_seen(clone, text) == [SPAN]
    with torch.no_grad():
        clone.text_projection.mul_(2)  # the copy's own weights, not the original's
        torch.testing.assert_close(clone.encode_text(text), 2 * spanned.encode_text(text))
    reference = make_reference(copy.deepcopy(spanned)).model  # the frozen reference copy gets it too
    assert runs_text_over_caption_span(reference) and positions_seen(reference, text) == [SPAN]


def test_the_linear_head_over_the_span(tiny_model, tokens):
    text = tokens["po-tiny"]
    model = rebound_copy(tiny_model)
    head = attach_linear_head(model)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    assert positions_seen(model, text) == [SPAN]
    expected = full_context(tiny_model, text) @ head.weight.T
    torch.testing.assert_close(model.encode_text(text), expected, rtol=1e-5, atol=1e-5)
    policy, reference = make_reference(is_base_of_head=True).step_features(model, torch.randn(2, 3, 64, 64), text)
    torch.testing.assert_close(reference.text, full_context(tiny_model, text, normalize=True), rtol=1e-5, atol=1e-5)


# -- a PO step --------------------------------------------------------------------------------------------------

def test_a_po_step_gives_the_same_loss_and_gradients(tiny_model, tokens):
    text = tokens["po-tiny"]
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(3, 3, 64, 64, generator=g), "chosen": text[[0, 1, 2]],
             "rejected": text[[3, 0, 1]], "reg_images": torch.randn(2, 3, 64, 64, generator=g),
             "reg_texts": text[[2, 3]]}
    results = []
    for span in (False, True):
        model = copy.deepcopy(tiny_model)
        if span:
            run_text_over_caption_span(model)
        reference = make_reference(copy.deepcopy(model))
        with torch.no_grad():
            for p in model.parameters():  # away from the reference, so the loss has a gradient
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        out = POCriterion(get_loss("dpo"), reference, POSettings(reg_lambda=0.5))(model, batch)
        out["loss"].backward()
        assert positions_seen(model, text) == [SPAN if span else text.shape[1]]
        assert positions_seen(reference.model, text) == [SPAN if span else text.shape[1]]
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (spanned, spanned_grads) = results
    for key in ("loss", "pref_loss", "reg_kl"):
        torch.testing.assert_close(spanned[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    for n, g in plain_grads.items():
        assert_same_gradient(spanned_grads[n], g, n)


# -- compile ----------------------------------------------------------------------------------------------------

def test_while_compiling_open_clips_own_full_length_path_runs(tiny_model, tokens):
    text = tokens["po-tiny"]
    spanned = rebound_copy(tiny_model)
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        assert positions_seen(spanned, text) == [text.shape[1]]
        got = spanned.encode_text(text)
    assert torch.equal(got, full_context(tiny_model, text))


def test_a_traced_encoder_keeps_open_clips_full_length(tiny_model, tokens):
    spanned = rebound_copy(tiny_model).requires_grad_(False)  # (tracing keeps the weights as constants)
    longer = tokens["po-tiny"].clone()
    longer[0, 1:12], longer[0, 12] = 320, 49407  # ends at position 12: a span of 16, where the example had 8
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: spanned.encode_text(t), (tokens["po-tiny"],), check_trace=False)
        torch.testing.assert_close(traced(longer), full_context(tiny_model, longer), rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_it_in_one_graph(tiny_model, tokens):
    text = tokens["po-tiny"]
    spanned = rebound_copy(tiny_model)
    torch._dynamo.reset()
    compiled = torch.compile(spanned.encode_text, backend="eager", fullgraph=True)  # a data-dependent shape breaks
    torch.testing.assert_close(compiled(text), full_context(tiny_model, text), rtol=1e-5, atol=1e-5)


# -- wiring: the run's policy and reference, the cache builder, the opt-out flag --------------------------------

def setup_args(**kw):
    return SimpleNamespace(**{"po_ref_cache": None, "po_linear_head": False, "po_ref_model": None,
                              "po_ref_pretrained": None, "lock_text": False, "lock_text_unlocked_layers": 0,
                              "lock_text_freeze_layer_norm": False, "po_full_text_context": False,
                              "po_head_towers": "both", "po_head_param": "log",
                              "model": "po-tiny", "precision": "fp32", "cache_dir": None, **kw})


@pytest.mark.parametrize("kw", [{}, {"po_linear_head": True}, {"po_ref_model": "po-tiny"}])
@pytest.mark.parametrize("full", [False, True])
def test_a_runs_policy_and_reference_and_the_opt_out(caplog, kw, full):
    from open_clip_po.trainer.model_setup import ModelSetup

    args = setup_args(po_full_text_context=full, **kw)
    setup = ModelSetup(lambda: args, open_clip.create_model_and_transforms)
    with caplog.at_level(logging.INFO):
        policy = setup.create_model_and_transforms("po-tiny", output_dict=True)[0]
    reference = setup.reference.model
    if kw.get("po_linear_head"):  # the head wraps the encoder it found: the span's, unless opted out
        assert reference is None and policy.encode_text_base.__func__.__name__ == (
            "encode_text" if full else "_clip_encode_text")
    else:
        assert runs_text_over_caption_span(policy) == runs_text_over_caption_span(reference) == (not full)
    lines = [r.getMessage() for r in caplog.records if "text tower" in r.getMessage()]
    assert len(lines) == (2 if reference is not None and kw.get("po_ref_model") else 1)
    expected = ("runs over all 16 context positions (--po-full-text-context)" if full
                else "runs over each batch's caption span")
    assert all(expected in line for line in lines) and lines[0].startswith("the policy's text tower")


def test_the_flag_parses_and_is_documented():
    from pathlib import Path

    from open_clip_po.flags import po_argument_parser

    parser = po_argument_parser()
    assert parser.parse_args(["--po-full-text-context"]).po_full_text_context
    assert not parser.parse_args([]).po_full_text_context
    assert "`--po-full-text-context`" in (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()


@pytest.mark.parametrize("full", [False, True])
def test_the_reference_cache_builder_runs_the_span(tmp_path, full):
    from open_clip_po.ref_cache import build as builder

    class Built(Exception):
        pass

    def capture(model, *a):
        raise Built(model)

    argv = ["--model", "po-tiny", "--train-data", str(tmp_path / "none.tar"), "--out", str(tmp_path / "cache")]
    with mock.patch.object(builder, "Encoder", capture), pytest.raises(Built) as built:
        builder.build(builder.parse_args(argv + (["--po-full-text-context"] if full else [])))
    assert runs_text_over_caption_span(built.value.args[0]) == (not full)


def test_configure_says_why_not(caplog):
    with caplog.at_level(logging.INFO):
        assert not configure_text_span(custom_text_po_tiny(pool_type="last"), False)
    assert "the policy's text tower runs over all 16 context positions: its text pooling is 'last'" in caplog.text
