"""open_clip training options combined with PO: each one either trains end to end (short po-tiny runs through
open_clip's trainer) or is refused at start-up with one line (open_clip_po.trainer.options, docs/training.md)."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import open_clip
import open_clip_po  # noqa: F401
from open_clip_po import losses as po_losses
from open_clip_po.checkpoint import atomic_save, load_checkpoint
from open_clip_po.flags import po_argument_parser
from open_clip_po.trainer.seam import main
from open_clip_po.trainer.options import check_open_clip_options, list_option_rules, plain_clip_run
from open_clip_po.reference import FrozenCopyReference
from po_toy import write_toy_shards
from train_helpers import base_args, make_toy, run_in_process

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def ckpt(tmp_path, name, epoch=1):
    return load_checkpoint(tmp_path / name / "checkpoints" / f"epoch_{epoch}.pt")["state_dict"]


def moved(before, after, prefix):
    names = [k for k in before if k.startswith(prefix)]
    assert names, prefix
    return {k: not torch.equal(before[k], after[k]) for k in names}


# -- refusals and warnings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--model", "coca_ViT-B-32"], "CoCa models cannot be combined with --po-loss: PO scores"),
    (["--distill-model", "po-tiny", "--distill-pretrained", "x.pt"], "--distill-model, --distill-pretrained cannot"),
])
def test_refused_options_are_one_line_errors(toy, tmp_path, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(base_args(toy, tmp_path, "refused", "--po-loss", "dpo") + extra)
    text = str(exc.value.code)
    assert text.startswith("open_clip_po.main: error: ") and message in text and "\n" not in text, text


def test_options_without_effect_warn(caplog):
    args = SimpleNamespace(model="po-tiny", local_loss=True, gather_with_grad=False)
    with caplog.at_level(logging.WARNING):
        check_open_clip_options(args)
    assert "--local-loss, --gather-with-grad has no effect on PO training" in caplog.text
    caplog.clear()
    check_open_clip_options(SimpleNamespace(model="po-tiny"))
    assert caplog.text == ""


def test_plain_clip_run_only_without_any_po_option():
    parser = po_argument_parser()

    def parsed(*argv):
        return parser.parse_known_args(list(argv))[0]

    assert plain_clip_run(parsed("--train-data", "x.tar", "--logs-dir", "logs"), parser)
    assert not plain_clip_run(parsed("--po-loss", "dpo"), parser)
    assert not plain_clip_run(parsed("--po-reg-data", "reg.tar"), parser)  # a PO run without its objective
    assert not plain_clip_run(parsed("--po-ref-model", "po-tiny"), parser)
    assert not plain_clip_run(parsed("--po-beta", "0.5"), parser)  # an alias of --po-hparam counts too


def test_every_rule_is_in_the_docs_table():
    text = (REPO / "docs" / "training.md").read_text()
    table = text[text.index("| open_clip option | with PO | why |"):]
    for rule in list_option_rules():
        assert f"| {rule.flags} | {rule.verdict} |" in table, rule.flags


# -- SigLIP: the logit bias cancels in the softmax over candidates ----------------------------------------------

# po-tiny-sigmoid: po-tiny with SigLIP's init_logit_bias (a name with "siglip" in it would make open_clip pick
# the T5 SigLIP tokenizer, which needs transformers)

def test_siglip_logit_bias_cancels_in_the_policy():
    torch.manual_seed(0)
    model = open_clip.create_model("po-tiny-sigmoid", output_dict=True)
    assert model.logit_bias is not None and float(model.logit_bias.detach()) == -10
    images, texts = torch.randn(3, 3, 64, 64), torch.randint(1, 400, (6, 16))
    out = model(images, texts)
    img, txt = out["image_features"], out["text_features"]
    with_bias = F.log_softmax(out["logit_scale"] * img @ txt.T + out["logit_bias"], dim=-1)  # SigLIP's logits
    chosen, rejected, matrix = po_losses.pair_logps(img, txt[:3], txt[3:], out["logit_scale"])
    torch.testing.assert_close(matrix, with_bias, rtol=1e-6, atol=1e-6)
    idx = torch.arange(3)
    torch.testing.assert_close(chosen, with_bias[idx, idx])
    torch.testing.assert_close(rejected, with_bias[idx, idx + 3])


# -- end to end -------------------------------------------------------------------------------------------------

def po(toy, tmp_path, name, *extra, epochs=1):
    return run_in_process(base_args(toy, tmp_path, name, "--po-loss", "dpo", *extra, epochs=epochs))


@pytest.mark.slow
@pytest.mark.integration
def test_grad_checkpointing_gives_the_same_steps(toy, tmp_path):
    session = po(toy, tmp_path, "checkpointed", "--grad-checkpointing")
    policy = session.setup.model
    assert policy.visual.transformer.grad_checkpointing and policy.transformer.grad_checkpointing
    po(toy, tmp_path, "plain")
    a, b = ckpt(tmp_path, "plain"), ckpt(tmp_path, "checkpointed")
    start = load_checkpoint(toy["pretrained"])["state_dict"]
    assert any(moved(start, a, "visual.").values())
    for name, value in a.items():  # recomputation is exact: same weights
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.integration
def test_lock_image_trains_only_the_text_side(toy, tmp_path):
    po(toy, tmp_path, "lockimg", "--lock-image")
    start, after = load_checkpoint(toy["pretrained"])["state_dict"], ckpt(tmp_path, "lockimg")
    assert not any(moved(start, after, "visual.").values())
    assert any(moved(start, after, "transformer.").values())


@pytest.mark.slow
@pytest.mark.integration
def test_lock_text_with_an_unlocked_layer(toy, tmp_path):
    # open_clip's groups from the end: 1 = text_projection, 2 = + last block and ln_final
    session = po(toy, tmp_path, "locktext", "--lock-text", "--lock-text-freeze-layer-norm",
                 "--lock-text-unlocked-layers", "2")
    # the last text layer trains: the reference keeps its own text tower
    assert type(session.reference) is FrozenCopyReference
    start, after = load_checkpoint(toy["pretrained"])["state_dict"], ckpt(tmp_path, "locktext")
    assert not any(moved(start, after, "transformer.resblocks.0.").values())
    assert not any(moved(start, after, "token_embedding").values())
    assert any(moved(start, after, "transformer.resblocks.1.").values())


@pytest.mark.slow
@pytest.mark.integration
def test_resampled_sources_with_upsampling_factors(toy, tmp_path):
    other = write_toy_shards(tmp_path / "other", num_samples=32, per_shard=16, seed=3)["pref"]
    po(toy, tmp_path, "resampled", "--train-data", f"{toy['pref']}::{other}", "--dataset-resampled",
       "--train-data-upsampling-factors", "1::2")
    log = (tmp_path / "resampled" / "out.log").read_text()
    assert "Train Epoch: 0 [96/96 (100%)]" in log and "dataset_resampled: True" in (
        tmp_path / "resampled" / "params.txt").read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_siglip_config_trains_and_its_bias_gets_no_gradient(toy, tmp_path):
    torch.manual_seed(0)
    pretrained = tmp_path / "siglip.pt"
    atomic_save({"state_dict": open_clip.create_model("po-tiny-sigmoid").state_dict()}, pretrained)
    argv = base_args(toy, tmp_path, "siglip", "--po-loss", "dpo", "--siglip", epochs=1)
    argv[argv.index("po-tiny")], argv[argv.index(toy["pretrained"])] = "po-tiny-sigmoid", str(pretrained)
    run_in_process(argv)
    after, start = ckpt(tmp_path, "siglip"), load_checkpoint(pretrained)["state_dict"]
    assert torch.equal(after["logit_bias"], start["logit_bias"])  # it cancels: zero gradient, never moves
    assert any(moved(start, after, "visual.").values())
    first = re.search(r"pref_loss: ([0-9.]+)", (tmp_path / "siglip" / "out.log").read_text())
    assert float(first.group(1)) == pytest.approx(math.log(2), abs=1e-4)  # θ = ref at the first step


@pytest.mark.slow
@pytest.mark.integration
def test_delete_previous_checkpoint_and_remote_sync(toy, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    po(toy, tmp_path, "synced", "--delete-previous-checkpoint", "--remote-sync", str(remote),
       "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "3600", epochs=2)
    local = tmp_path / "synced" / "checkpoints"
    assert sorted(p.name for p in local.iterdir()) == ["epoch_2.pt", "epoch_latest.pt"]
    copied = load_checkpoint(remote / "synced" / "checkpoints" / "epoch_2.pt")
    assert copied["po_version"] == open_clip_po.__version__ and copied["epoch"] == 2
    assert (remote / "synced" / "out.log").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_torchcompile_serves_the_criterion(toy, tmp_path, monkeypatch):
    # dynamo traces the policy as with inductor; aot_eager skips inductor's C++ code generation, which costs
    # minutes of CPU here and has nothing PO-specific (a full inductor run of this test trains the same way)
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    session = po(toy, tmp_path, "compiled", "--torchcompile")
    assert compiled == [session.setup.model]  # the policy, never the reference
    start, after = load_checkpoint(toy["pretrained"])["state_dict"], ckpt(tmp_path, "compiled")
    assert set(after) == set(start)  # saved without torch.compile's _orig_mod. prefix
    assert any(moved(start, after, "visual.").values())
    log = (tmp_path / "compiled" / "out.log").read_text()
    assert "Compiling model..." in log and "Train Epoch: 0 [96/96 (100%)]" in log
