"""Plain CLIP training through ``python -m open_clip_po.main`` (no ``--po-*`` flag) runs its text tower over each
batch's caption span (open_clip_po.towers.text_span): open_clip's own loss, loop and features, to float rounding, at a
fraction of the text positions; ``--po-full-text-context`` keeps open_clip's full context."""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import open_clip
import open_clip_po  # noqa: F401  (registers po-tiny)
import open_clip_po.trainer.seam as seam
from open_clip_po.towers import text_span
from open_clip_po.trainer.model_setup import ModelSetup
from open_clip_po.trainer.options import plain_clip_run
from open_clip_po.towers.text_span import runs_text_over_caption_span
from train_helpers import make_toy

# mixed lengths (3–8 tokens with start and end of text): the longest makes the span 8 of po-tiny's 16 positions
CAPTIONS = ["a dog", "a photo of a dog.", "The man is cooking", "cat"]
SPAN, CONTEXT = 8, 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("plain"), num_samples=32, per_shard=16)


def plain_argv(toy, logs, name, *extra):
    """open_clip's own CLIP training on the toy's clean image-caption shards: no --po-* flag."""
    return ["--model", "po-tiny", "--pretrained", toy["pretrained"], "--train-data", toy["reg"],
            "--dataset-type", "webdataset", "--train-num-samples", "32", "--batch-size", "8", "--epochs", "1",
            "--lr", "1e-3", "--wd", "0", "--warmup", "1", "--precision", "fp32", "--workers", "0", "--seed", "0",
            "--logs-dir", str(logs), "--name", name, "--log-every-n-steps", "1", *extra]


def run_plain(argv):
    """``open_clip_po.trainer.seam.main(argv)`` in this process; returns its session and the span of every text-tower pass
    that ran over a caption span."""
    sessions, spans = [], []
    make_session, tower = seam.POSession, text_span._tower

    def session(*a, **kw):
        sessions.append(make_session(*a, **kw))
        return sessions[-1]

    def spanned_tower(*a):
        spans.append(a[-1])  # n, the positions this pass runs over
        return tower(*a)

    with mock.patch.object(seam, "POSession", side_effect=session), \
            mock.patch.object(text_span, "_tower", side_effect=spanned_tower):
        assert seam.main(argv) == 0
    (only,) = sessions
    return only, spans


def full_context_copy(model):
    """The same weights with open_clip's own ``CLIP.encode_text`` (all context positions)."""
    full = copy.deepcopy(model)
    if "encode_text" in vars(full):
        del full.encode_text
    return full


def clip_step(model, images, texts):
    """One open_clip ClipLoss step's loss, features and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(images, texts)
    loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.detach(), out["text_features"].detach(), {n: p.grad for n, p in model.named_parameters()}


def test_the_opt_out_and_logs_dir_keep_a_run_plain():
    parser = seam.po_argument_parser()
    for argv in (["--po-full-text-context"], ["--logs-dir", "x", "--po-full-text-context"]):
        assert plain_clip_run(parser.parse_known_args(argv)[0], parser)
    assert not plain_clip_run(parser.parse_known_args(["--po-full-text-context", "--po-beta", "1"])[0], parser)


@pytest.mark.parametrize("full", [False, True])
def test_the_plain_model_hook_applies_the_span_and_builds_no_reference(caplog, full):
    args = SimpleNamespace(po_full_text_context=full)
    setup = ModelSetup(lambda: args, open_clip.create_model_and_transforms, plain=True)
    with caplog.at_level(logging.INFO):
        model = setup.create_model_and_transforms("po-tiny", output_dict=True)[0]
    assert setup.model is model and setup.reference is None
    assert runs_text_over_caption_span(model) == (not full)
    expected = ("the model's text tower runs over all 16 context positions (--po-full-text-context)" if full
                else "the model's text tower runs over each batch's caption span")
    assert expected in caplog.text


@pytest.mark.slow
@pytest.mark.integration
def test_a_plain_run_trains_over_the_caption_span_with_open_clips_features_and_gradients(toy, tmp_path):
    session, spans = run_plain(plain_argv(toy, tmp_path, "span"))
    log = (tmp_path / "span" / "out.log").read_text()
    assert "contrastive_loss" in log and "po_loss: None" in log  # open_clip's own CLIP training
    assert "the model's text tower runs over each batch's caption span" in log
    model = session.setup.model
    assert session.setup.reference is None and runs_text_over_caption_span(model)
    # the toy's captions ("a photo of a red.") end at position 7: every training pass ran over 8 of 16 positions
    assert len(spans) >= 4 and set(spans) == {SPAN}

    # The trained model's step against open_clip's full-context step on the same weights and batch.
    texts = open_clip.get_tokenizer("po-tiny")(CAPTIONS)
    assert texts.shape[1] == CONTEXT and int(texts.argmax(-1).max()) == SPAN - 1
    images = torch.randn(len(CAPTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.train()
    full = full_context_copy(model)
    seen = []
    for m in (model, full):
        m.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    loss, features, grads = clip_step(model, images, texts)
    full_loss, full_features, full_grads = clip_step(full, images, texts)
    assert seen == [SPAN, CONTEXT]
    torch.testing.assert_close(features, full_features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(full_grads) and all(g is not None for g in full_grads.values())
    for name, expected in full_grads.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)


@pytest.mark.slow
@pytest.mark.integration
def test_po_full_text_context_keeps_open_clips_full_context_in_a_plain_run(toy, tmp_path):
    session, spans = run_plain(plain_argv(toy, tmp_path, "full", "--po-full-text-context"))
    log = (tmp_path / "full" / "out.log").read_text()
    assert "contrastive_loss" in log and "po_full_text_context: True" in log
    assert "the model's text tower runs over all 16 context positions (--po-full-text-context)" in log
    assert not runs_text_over_caption_span(session.setup.model) and spans == []
