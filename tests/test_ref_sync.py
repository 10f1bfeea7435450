"""A reference that follows the policy (TR-DPO): θ_ref ← α θ + (1 − α) θ_ref every N optimizer steps."""
from __future__ import annotations

import pytest
import torch

import open_clip_train.main as ocm
from open_clip_po.checkpoint import REFERENCE_KEY, load_checkpoint, strip_module_prefix
from open_clip_po.trainer.seam import patched_open_clip_train
from train_helpers import base_args, make_toy, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("sync"), num_samples=64, per_shard=32)


def test_the_reference_moves_by_alpha_towards_the_policy_every_n_steps(toy, tmp_path):
    argv = base_args(toy, tmp_path, "sync", "--po-loss", "dpo", "--po-ref-sync-steps", "3",
                     "--po-ref-sync-alpha", "0.25", "--batch-size", "8", epochs=1)
    expected, seen_steps = None, []
    with patched_open_clip_train() as session:
        real_parse = session.parse_args

        def parse_then_watch(a):
            args = real_parse(a)
            real_good_step = session.hooks.good_step

            def good_step(step):  # replay the update by hand from the policy the hook sees
                nonlocal expected
                if expected is None:
                    expected = {k: v.clone() for k, v in session.reference.state_dict().items()}
                real_good_step(step)
                if (step + 1) % 3 == 0:
                    seen_steps.append(step)
                    policy = session.setup.model.state_dict()
                    for k, v in expected.items():
                        if v.is_floating_point():
                            v.mul_(0.75).add_(policy[k], alpha=0.25)
            session.hooks.good_step = good_step
            return args
        ocm.parse_args = parse_then_watch
        assert ocm.main(argv) in (None, 0)
    assert seen_steps == [2, 5]  # 8 steps, a sync after the 3rd and the 6th
    saved = load_checkpoint(tmp_path / "sync" / "checkpoints" / "epoch_1.pt")[REFERENCE_KEY]
    start = load_checkpoint(toy["pretrained"])["state_dict"]
    moved = False
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-7, msg=name)
        moved |= not torch.equal(value, start[name])
    assert moved


def test_two_ranks_sync_alike_and_a_resumed_run_restores_the_moved_reference(toy, tmp_path):
    common = ["--po-loss", "dpo", "--po-ref-sync-steps", "2", "--po-ref-sync-alpha", "0.5", "--batch-size", "4",
              "--lr-scheduler", "const"]
    run_cli(base_args(toy, tmp_path, "straight", *common, epochs=2), nproc=2)
    run_cli(base_args(toy, tmp_path, "resumed", *common, epochs=1), nproc=2)
    run_cli(base_args(toy, tmp_path, "resumed", *common, "--resume", "latest", epochs=2), nproc=2)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch_2.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch_2.pt")
    first = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch_1.pt")
    for name, value in a[REFERENCE_KEY].items():
        assert torch.equal(b[REFERENCE_KEY][name], value), name
    assert any(not torch.equal(first[REFERENCE_KEY][k], v) for k, v in a[REFERENCE_KEY].items())
    policy = strip_module_prefix(a["state_dict"])
    for name, value in policy.items():
        assert torch.equal(strip_module_prefix(b["state_dict"])[name], value), name
