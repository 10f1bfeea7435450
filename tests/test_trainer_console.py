"""What ``open_clip_po.main`` prints: a start-up summary of what the run will do, lines from rank 0 only under
torchrun (every rank's errors), each line once, and the TR-DPO syncs it made."""
from __future__ import annotations

import re

import pytest
from open_clip_train.params import parse_args as open_clip_parse_args

from open_clip_po.trainer.cli import parse_po_args
from open_clip_po.trainer.console import run_summary
from train_helpers import base_args, make_toy, run_cli


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def summary(toy, tmp_path, *flags) -> dict[str, str]:
    """The summary of a run with ``flags``: its first line under "", then each "  key: value" line by key."""
    lines = run_summary(parse_po_args(base_args(toy, tmp_path, "s", *flags), open_clip_parse_args))
    out = {"": lines[0]}
    for line in lines[1:]:
        key, _, value = line.strip().partition(": ")
        out[key] = value
    return out


def test_summary_of_a_dpo_run_with_online_reference_regulariser_and_bma(toy, tmp_path):
    s = summary(toy, tmp_path, "--po-loss", "dpo", "--po-beta", "0.5", "--po-reg-lambda", "0.1",
                "--po-average", "bma", "--po-bma-gamma", "0.5")
    assert s[""] == f"open_clip_po: preference optimisation of po-tiny fully fine-tuned, starting from " \
                    f"{toy['pretrained']}"
    assert s["objective"] == ("dpo (beta=0.5, label_smoothing=0.0, f_divergence_type=reverse_kl, "
                              "f_alpha_divergence_coef=1.0)")
    assert s["reference"] == f"online: a frozen copy of the policy at its start ({toy['pretrained']})"
    assert s["reference sync"] == "none, the reference stays as it started"
    assert s["candidates"] == "the captions of the global batch"
    assert s["regulariser"] == f"λ = 0.1 × KL(π_θ‖π_ref) on {toy['reg']}"
    assert s["weight averaging"] == "BMA, γ = 0.5 (saved in each checkpoint)"


def test_summary_of_a_head_a_cache_tr_dpo_and_a_mixture(toy, tmp_path):
    head = summary(toy, tmp_path, "--po-loss", "kto", "--po-linear-head", "--po-head-towers", "image",
                   "--po-candidates", "classes", "--po-classnames", toy["classnames"], "--po-average", "ema")
    assert head[""].startswith("open_clip_po: preference optimisation of a linear head W on the frozen towers of "
                               "po-tiny (image tower)")
    assert head["objective"] == "kto (beta=1.5, desirable_weight=1.0, undesirable_weight=1.0)"   # KTO's default β
    assert head["reference"] == "the frozen backbone without W (no second model)"
    assert head["candidates"] == f"one prompt per class of {toy['classnames']}, 'a photo of a {{}}.'"
    assert head["weight averaging"] == "EMA, decay 0.999 (saved in each checkpoint)"

    cached = summary(toy, tmp_path, "--po-loss", "ipo", "--po-ref-cache", str(tmp_path / "cache"))
    assert cached["reference"] == (f"cached features from {tmp_path / 'cache'} (python -m open_clip_po.ref_cache); "
                                   "no reference model")

    synced = summary(toy, tmp_path, "--po-loss", "dpo", "--po-ref-sync-steps", "4", "--po-ref-sync-alpha", "0.5")
    assert synced["reference sync"] == ("every 4 optimizer steps, θ_ref ← α θ + (1 − α) θ_ref with α = 0.5 "
                                        "(TR-DPO)")

    mixture = summary(toy, tmp_path, "--po-loss", "dpo,ce", "--po-loss-weights", "1,0.1", "--po-reg-kl", "reverse")
    assert re.fullmatch(r"1 × dpo \(beta=1\.0, .*\) \+ 0\.1 × ce", mixture["objective"]), mixture["objective"]
    assert mixture["regulariser"].startswith("λ = 1 × KL(π_ref‖π_θ) on ")


def test_summary_says_when_the_reference_goes_unused_and_when_the_run_is_plain_clip(toy, tmp_path):
    args = parse_po_args([a for a in base_args(toy, tmp_path, "s", "--po-loss", "ref_free")], open_clip_parse_args)
    args.po_reg_data = None
    assert run_summary(args)[2].endswith("; unused (the objective needs none and there is no regulariser)")
    plain = parse_po_args(["--model", "po-tiny", "--train-data", toy["pref"]], open_clip_parse_args)
    assert run_summary(plain) == ["open_clip_po: plain CLIP training (no --po-loss): open_clip's own loss and loop, "
                                  "shuffles seeded from --seed"]


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_print_each_line_once_from_rank_zero(toy, tmp_path):
    # --po-kto-kl exact with DPO: a warning at flag checking, before open_clip sets up its logging
    proc = run_cli(base_args(toy, tmp_path, "two", "--po-loss", "dpo", "--po-kto-kl", "exact",
                             "--po-ref-sync-steps", "1", epochs=1), nproc=2)
    console = proc.stderr
    once = ["open_clip_po: preference optimisation of po-tiny fully fine-tuned", "  objective: dpo (beta=1.0",
            "Start epoch 0", "Train Epoch: 0 done: ", "D_reg: 2 shard(s)", "bad samples skipped (epoch 0, all ranks)",
            "the policy's text tower runs over", "Loaded built-in po-tiny model config",
            "--po-kto-kl has no effect with --po-loss dpo", "TR-DPO: the reference moved towards the policy 3 time(s) "
            "in epoch 0 (every 1 optimizer steps, α = 0.6)"]
    for text in once:
        assert console.count(text) == 1, (text, console[-3000:])
    assert "global: 1" not in console and "[rank1]" not in console   # rank 1 says nothing on the console
    assert "WARNING:root:" not in console   # no second, unformatted console handler
    assert console.count("Device cuda was not available") <= 1   # open_clip's Python warning, on a CPU: once
    # open_clip's out.log (rank 0) has the summary and the early warning too, each once
    out_log = (tmp_path / "two" / "out.log").read_text()
    for text in once[:2] + ["--po-kto-kl has no effect"]:
        assert out_log.count(text) == 1, text
