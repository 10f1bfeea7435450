"""End-to-end training through open_clip's own trainer, on po-tiny and the toy preference shards."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import open_clip
import open_clip_po  # noqa: F401
import open_clip_train.main as ocm
from open_clip_po.checkpoint import atomic_save, create_model_from_checkpoint, load_checkpoint
from open_clip_po.trainer.seam import PATCHED, patched_open_clip_train
from train_helpers import REPO, base_args, make_toy, run_cli, run_in_process

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def toy_triplets(toy):
    """All (image, y_w, y_l) of the toy pref shards, preprocessed for po-tiny."""
    import io
    import tarfile

    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms("po-tiny")
    tokenizer = open_clip.get_tokenizer("po-tiny")
    groups = {}
    for path in sorted(Path(toy["root"], "shards").glob("pref-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
    images = torch.stack([preprocess(Image.open(io.BytesIO(g["png"]))) for g in groups.values()])
    chosen = tokenizer([g["yw.txt"].decode() for g in groups.values()])
    rejected = tokenizer([g["yl.txt"].decode() for g in groups.values()])
    return images, chosen, rejected


@torch.no_grad()
def preference_stats(model, ref_model, triplets, beta=1.0):
    """(fraction of triplets where the policy scores y_w above y_l, mean DPO loss of the policy vs ref)."""
    images, chosen, rejected = triplets

    def margins(m):
        m.eval()
        img = m.encode_image(images, normalize=True)
        tw, tl = m.encode_text(chosen, normalize=True), m.encode_text(rejected, normalize=True)
        scale = m.logit_scale.exp()
        return scale * ((img * tw).sum(-1) - (img * tl).sum(-1))

    policy, ref = margins(model), margins(ref_model)
    h = policy - ref  # the partition function cancels (design.md §1)
    return {"prefers_yw": float((policy > 0).float().mean()),  # the policy ranks y_w above y_l
            "reward_accuracy": float((h > 0).float().mean()),  # TRL's rewards/accuracies (0 at θ = ref)
            "dpo_loss": float(-torch.nn.functional.logsigmoid(beta * h).mean())}


def assert_learned(after, before):
    assert before["dpo_loss"] == pytest.approx(math.log(2)) and before["reward_accuracy"] == 0
    assert after["reward_accuracy"] >= 0.65, after
    assert after["prefers_yw"] > before["prefers_yw"] + 0.05, (before, after)
    assert after["dpo_loss"] < math.log(2) - 0.02, after


def load_policy(toy, ckpt, weights="raw"):
    model, _, _ = create_model_from_checkpoint("po-tiny", ckpt, weights=weights)
    return model


def load_reference(toy):
    return load_policy(toy, toy["pretrained"])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto"])
def test_single_process_training_learns_the_toy_preferences(toy, tmp_path, loss):
    extra = {"dpo": [], "ipo": ["--po-beta", "0.1"], "kto": []}[loss]
    run_cli(base_args(toy, tmp_path, loss, "--po-loss", loss, *extra))
    run_dir = tmp_path / loss
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"]
    params = (run_dir / "params.txt").read_text()
    assert f"po_loss: {loss}" in params and "po_reg_lambda: 1.0" in params
    triplets, ref = toy_triplets(toy), load_reference(toy)
    before = preference_stats(ref, ref, triplets)
    assert_learned(preference_stats(load_policy(toy, run_dir / "checkpoints" / "epoch_2.pt"), ref, triplets), before)
    log = (run_dir / "out.log").read_text()
    assert "rewards/accuracies" in log and "reg_kl" in log
    assert "bad samples skipped (epoch 1, all ranks): none; run total: none" in log
    assert "bad samples skipped (end of training, all ranks): none; run total: none" in log


@pytest.mark.slow
@pytest.mark.parametrize("loss,extra", [
    ("dpo", ["--lock-text", "--lock-text-freeze-layer-norm", "--opt", "timm/adamax", "--lr", "5e-3"]),
    ("ipo", ["--po-beta", "0.1"]),
    ("kto", ["--po-kto-kl", "exact"]),
])
def test_torchrun_two_processes_gloo(toy, tmp_path, loss, extra):
    # batch 8 per rank: the same global batch, and so the same number of steps, as the 1-process runs
    run_cli(base_args(toy, tmp_path, loss, "--po-loss", loss, "--batch-size", "8", *extra), nproc=2)
    run_dir = tmp_path / loss
    ckpt = load_checkpoint(run_dir / "checkpoints" / "epoch_2.pt")
    assert all(k.startswith("module.") for k in ckpt["state_dict"])  # DDP really wrapped the policy
    assert "opt: timm/adamax" in (run_dir / "params.txt").read_text() or loss != "dpo"
    ref, triplets = load_reference(toy), toy_triplets(toy)
    policy = load_policy(toy, run_dir / "checkpoints" / "epoch_2.pt")
    assert_learned(preference_stats(policy, ref, triplets), preference_stats(ref, ref, triplets))
    if "--lock-text" in extra:
        for name, p in policy.named_parameters():
            if name.startswith(("transformer.", "token_embedding", "ln_final", "text_projection")):
                torch.testing.assert_close(p, dict(ref.named_parameters())[name], rtol=0, atol=0)


@pytest.mark.slow
def test_reference_stays_frozen_and_globals_are_restored(toy, tmp_path):
    originals = {name: getattr(ocm, name) for name in PATCHED}
    session = run_in_process(base_args(toy, tmp_path, "frozen", "--po-loss", "dpo", epochs=1))
    assert {name: getattr(ocm, name) for name in PATCHED} == originals
    ref_model = session.reference.model
    start = load_reference(toy).state_dict()
    for name, value in ref_model.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert all(not p.requires_grad and p.grad is None for p in ref_model.parameters())
    assert not ref_model.training
    trained = load_policy(toy, tmp_path / "frozen" / "checkpoints" / "epoch_1.pt").state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # while the policy did move


@pytest.mark.slow
def test_linear_head_mode_trains_only_w(toy, tmp_path):
    run_in_process(base_args(toy, tmp_path, "head", "--po-loss", "dpo", "--po-linear-head", "--lr", "1e-2",
                             epochs=1))
    ckpt = load_checkpoint(tmp_path / "head" / "checkpoints" / "epoch_1.pt")
    start = load_checkpoint(toy["pretrained"])["state_dict"]
    assert set(ckpt["state_dict"]) == set(start)  # the head lives outside state_dict
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(value, start[name]), name
    W = ckpt["po_head"]["weight"]
    assert W.shape == (32, 32) and not torch.allclose(W, torch.eye(32))
    # the default head is W = exp(A) with A symmetric; the checkpoint keeps both
    A = ckpt["po_head"]["log"]
    assert ckpt["po_head"]["param"] == "log" and torch.equal(A, A.T)
    torch.testing.assert_close(W.double(), torch.linalg.matrix_exp(A.double()), rtol=1e-5, atol=1e-6)
    assert "reg_kl_reversed" in (tmp_path / "head" / "out.log").read_text()   # μ = λ by default
    policy = load_policy(toy, tmp_path / "head" / "checkpoints" / "epoch_1.pt")
    assert preference_stats(policy, load_reference(toy), toy_triplets(toy))["dpo_loss"] < math.log(2)


@pytest.mark.slow
def test_resume_matches_a_straight_run_including_bma(toy, tmp_path):
    args = ["--po-loss", "dpo", "--po-average", "bma"]
    run_in_process(base_args(toy, tmp_path, "straight", *args))

    class Interrupted(Exception):
        pass

    argv = base_args(toy, tmp_path, "resumed", *args)
    with pytest.raises(Interrupted), patched_open_clip_train() as session:
        real = session.train_one_epoch

        def stop_at_second_epoch(model, data, loss, epoch, *rest, **kw):
            if epoch == 1:
                raise Interrupted  # as if the job were killed after epoch 1's checkpoint
            return real(model, data, loss, epoch, *rest, **kw)

        ocm.train_one_epoch = stop_at_second_epoch
        ocm.main(argv)
    run_in_process(argv + ["--resume", "latest"])

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch_2.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch_2.pt")
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert a["po_average"]["kind"] == "bma"
    assert a["po_average"]["state"]["num_updates"] == b["po_average"]["state"]["num_updates"] == 12
    for name, value in a["po_average"]["state_dict"].items():
        torch.testing.assert_close(b["po_average"]["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the average is not the last iterate
    assert any(not torch.allclose(a["po_average"]["state_dict"][k], v)
               for k, v in a["state_dict"].items() if v.is_floating_point())


@pytest.mark.slow
def test_checkpoint_loads_in_stock_open_clip(toy, tmp_path):
    run_in_process(base_args(toy, tmp_path, "stock", "--po-loss", "ipo", "--po-linear-head", epochs=1))
    path = tmp_path / "stock" / "checkpoints" / "epoch_1.pt"
    model, _, _ = open_clip.create_model_and_transforms("po-tiny", pretrained=str(path))
    assert not hasattr(model, "po_head")  # stock open_clip: the base model, the head is simply not there


@pytest.mark.slow
def test_non_finite_losses_skip_steps_then_stop_with_a_checkpoint(toy, tmp_path, monkeypatch, caplog):
    from open_clip_po.criterion import POCriterion
    from open_clip_po.trainer.hooks import TooManyBadSteps

    real = POCriterion.forward
    calls = {"n": 0}

    def poisoned(self, model, batch):
        out = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:  # one lone bad step, then a run of them
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(POCriterion, "forward", poisoned)
    argv = base_args(toy, tmp_path, "nan", "--po-loss", "dpo", "--po-max-bad-steps", "3", epochs=1)
    with pytest.raises(TooManyBadSteps, match=r"3 non-finite PO losses in a row at epoch 0; last good weights"):
        run_in_process(argv)
    assert "step skipped (1/3 in a row)" in caplog.text
    saved = load_checkpoint(tmp_path / "nan" / "checkpoints" / "bad_steps_epoch_0.pt")
    assert saved["epoch"] == 0 and torch.isfinite(torch.cat([v.flatten().float() for v in
                                                             saved["state_dict"].values()])).all()


def test_bad_flag_combinations_are_one_line_errors(toy, tmp_path):
    from open_clip_po.trainer.seam import main

    cases = [
        ([], "--po-loss is required"),
        (["--po-loss", "nope"], "unknown --po-loss 'nope'; known: "),
        (["--po-loss", "dpo,nope"], "unknown --po-loss 'nope'; known: "),
        (["--po-loss", "dpo,ce", "--po-loss-weights", "1"], "weights"),
        (["--po-loss", "dpo", "--po-hparam", "simpo_gamma=1"], "simpo_gamma"),
        (["--po-loss", "dpo", "--po-candidates", "classes"], "--po-candidates classes needs --po-classnames"),
        (["--po-loss", "dpo", "--po-linear-head", "--po-ref-model", "po-tiny"], "--po-linear-head uses the frozen"),
        (["--po-loss", "dpo", "--po-desirable-weight", "2"], "desirable_weight"),
        (["--po-loss", "dpo", "--po-eval-weights", "average"], "--po-eval-weights average needs --po-average"),
        (["--po-loss", "dpo", "--po-eval-images", str(tmp_path / "nowhere")], "no such file or directory"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(base_args(toy, tmp_path, "bad") + extra)
        text = str(exc.value.code)
        assert text.startswith("open_clip_po.main: error:") and message in text and "\n" not in text, text
    # and on the command line it is exactly one line on stderr
    proc = subprocess.run([sys.executable, "-m", "open_clip_po.main", *base_args(toy, tmp_path, "bad")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    from open_clip_po.losses import list_losses

    assert proc.stderr.strip().splitlines() == ["open_clip_po.main: error: --po-loss is required (one of: "
                                                + ", ".join(list_losses()) + ")"]


@pytest.mark.slow
def test_per_epoch_typographic_eval_is_logged(toy, tmp_path):
    import io
    import json
    import random

    from PIL import Image

    from open_clip_po.data.typographic import build_eval_folder
    from po_toy import COLOURS, colour_image

    clean = tmp_path / "clean"
    rng = random.Random(0)
    for name in COLOURS:
        (clean / name).mkdir(parents=True)
        for j in range(2):
            Image.open(io.BytesIO(colour_image(name, rng))).save(clean / name / f"{j}.png")
    build_eval_folder(clean, tmp_path / "attacked", list(COLOURS), image_size=64, quiet=True)
    run_in_process(base_args(toy, tmp_path, "evalrun", "--po-loss", "dpo", "--po-eval-images", str(clean),
                             "--po-eval-typographic", str(tmp_path / "attacked"), epochs=2))
    lines = [json.loads(line) for line in (tmp_path / "evalrun" / "po_eval.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for record in lines:
        assert set(record) == {"epoch", "po/clean_top1", "po/typographic_top1", "po/written_rate"}
        assert all(0.0 <= v <= 1.0 for k, v in record.items() if k != "epoch")
    assert "Eval Epoch: 2 po/clean_top1" in (tmp_path / "evalrun" / "out.log").read_text()


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch(toy, tmp_path):
    # DPO does not depend on the candidate set (Lemma 3.1), so two micro-batches of 8 = one batch of 16;
    # plain SGD keeps the comparison linear (Adam would magnify float noise in near-zero gradients)
    common = ["--po-loss", "dpo", "--po-reg-lambda", "0", "--lr-scheduler", "const", "--opt", "timm/sgd",
              "--lr", "0.1"]
    run_in_process(base_args(toy, tmp_path, "big", *common, epochs=1))
    run_in_process(base_args(toy, tmp_path, "accum", *common, "--batch-size", "8", "--accum-freq", "2", epochs=1))
    a = load_checkpoint(tmp_path / "big" / "checkpoints" / "epoch_1.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "accum" / "checkpoints" / "epoch_1.pt")["state_dict"]
    start = load_checkpoint(toy["pretrained"])["state_dict"]
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for name, value in a.items():  # float summation order differs: compare to how far the weights moved
        moved = (value - start[name]).abs().max().item()
        torch.testing.assert_close(b[name], value, rtol=1e-3, atol=1e-4 * max(moved, 1e-3), msg=name)


@pytest.mark.slow
def test_a_weighted_mixture_trains_under_torchrun_and_logs_each_term(toy, tmp_path):
    import re

    run_cli(base_args(toy, tmp_path, "rpo", "--po-loss", "dpo,ce", "--po-loss-weights", "1,0.1", "--batch-size", "8",
                      epochs=1), nproc=2)
    log = (tmp_path / "rpo" / "out.log").read_text()
    steps = re.findall(r" dpo/loss: ([0-9.e+-]+) .*? ce/loss: ([0-9.e+-]+) .*? pref_loss: ([0-9.e+-]+) ", log)
    assert len(steps) == 6, log[-2000:]
    for dpo, ce, pref in (tuple(map(float, s)) for s in steps):
        assert pref == pytest.approx(dpo + 0.1 * ce, rel=1e-3, abs=1e-4)  # the logged sum of the weighted terms
    assert float(steps[0][0]) == pytest.approx(math.log(2), abs=1e-3)  # DPO at θ = ref
