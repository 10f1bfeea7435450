"""fp16 AMP (--precision amp) with GradScaler: a step the scaler skips is not a bad step and does not feed the
weight average; a non-finite loss (a bad batch) still counts. The scaler is active on CPU."""
from __future__ import annotations

import logging

import pytest
import torch

from open_clip_po.trainer.amp import loss_scale, scaler_skipped_step
from open_clip_po.checkpoint import load_checkpoint
from train_helpers import base_args, make_toy, run_in_process


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def one_step(scaler, factor: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    loss = model(torch.randn(8, 4)).pow(2).mean() * factor
    scale = loss_scale(scaler)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return torch.isfinite(loss).item(), scaler_skipped_step(scaler, scale), not torch.equal(before, model.weight)


def test_scaler_skip_is_told_from_a_taken_step():
    scaler = torch.amp.GradScaler(device="cpu")
    assert scaler.is_enabled() and loss_scale(scaler) == 65536.0
    finite, skipped, moved = one_step(scaler, 1.0)
    assert (finite, skipped, moved) == (True, False, True)
    # a finite loss whose scaled gradients overflow float32: the scaler skips the step and halves its scale
    finite, skipped, moved = one_step(scaler, 1e36)
    assert (finite, skipped, moved) == (True, True, False)
    assert loss_scale(scaler) == 32768.0
    finite, skipped, moved = one_step(scaler, 1.0)
    assert (skipped, moved) == (False, True)


def test_no_active_scaler_never_skips():
    assert loss_scale(None) is None and not scaler_skipped_step(None, None)
    disabled = torch.amp.GradScaler(device="cpu", enabled=False)
    assert loss_scale(disabled) is None and not scaler_skipped_step(disabled, None)


@pytest.mark.slow
@pytest.mark.integration
def test_amp_run_counts_bad_batches_but_not_scaler_skips(toy, tmp_path, monkeypatch, caplog):
    from open_clip_po.criterion import POCriterion

    real = POCriterion.forward
    calls = {"n": 0}

    def poisoned(self, model, batch):
        out = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 2:  # finite loss, overflowing scaled gradients: the scaler's business
            out["loss"] = out["loss"].float() * 1e36
        if calls["n"] == 4:  # a bad batch
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(POCriterion, "forward", poisoned)
    caplog.set_level(logging.INFO)
    run_in_process(base_args(toy, tmp_path, "amp", "--po-loss", "dpo", "--precision", "amp", "--po-average", "ema",
                             "--po-max-bad-steps", "3", epochs=1))
    assert calls["n"] == 6
    warnings = [r.getMessage() for r in caplog.records if "non-finite PO loss" in r.getMessage()]
    assert len(warnings) == 1 and "(1/3 in a row)" in warnings[0]
    # fp16 at scale 2**16 also overflows by itself now and then (the first step here): count every skip
    skips = sum("optimizer step skipped" in r.getMessage() for r in caplog.records)
    assert skips >= 1
    ckpt = load_checkpoint(tmp_path / "amp" / "checkpoints" / "epoch_1.pt")
    assert ckpt["scaler"]["scale"] == 65536.0 / 2 ** skips  # one backoff per skip; the bad batch never reached it
    # of 6 batches, the bad one made no step and the scaler did not take `skips` of the other 5: only the rest
    # count as done, and only their samples as trained on
    done = [r.getMessage() for r in caplog.records if "Train Epoch: 0 done:" in r.getMessage()]
    assert len(done) == 1
    assert done[0].startswith(f"Train Epoch: 0 done: {5 - skips}/6 optimizer steps; samples trained on per rank: "
                              f"[{(5 - skips) * 16}]; {skips} step(s) not taken: the GradScaler found inf/NaN "
                              "gradients"), done[0]
    assert ckpt["po_average"]["state"]["num_updates"] == 6 - 1 - skips  # neither kind of skipped step is averaged
