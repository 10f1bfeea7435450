"""Runs launched through open_clip_po.main are a function of --seed: open_clip's own webdataset shuffles are
seeded (open_clip_po.trainer.seeding), PO runs and plain CLIP runs repeat step for step, and the seed matters."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import open_clip
import open_clip_po  # noqa: F401
import open_clip_train.data as ocd
from launch_helpers import losses_by_epoch, probe_records, run_single_node
from open_clip_po.trainer.seam import patched_open_clip_train
from open_clip_po.trainer.seeding import SEEDED_DATA_GLOBALS
from po_toy import write_toy_shards
from train_helpers import make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("repro"), num_samples=64, per_shard=16)
    other = write_toy_shards(toy["root"] / "other", num_samples=32, per_shard=16, seed=1)
    return {**toy, "other_reg": other["reg"]}


def clip_args(train_data, seed=0, **kw):
    base = dict(train_data=train_data, val_data=None, train_num_samples=64, dataset_resampled=False,
                train_data_upsampling_factors=None, seed=seed, batch_size=8, workers=0, world_size=1, rank=0)
    return SimpleNamespace(**{**base, **kw})


def _pixels(image):
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def sample_order(args, epoch, seeded=True) -> list[str]:
    """The samples of one epoch of open_clip's get_wds_dataset, as fingerprints, in the order they come."""
    tokenizer = open_clip.get_tokenizer("po-tiny")
    if seeded:
        with patched_open_clip_train() as session:
            session.args = args
            info = ocd.get_wds_dataset(args, _pixels, is_train=True, epoch=epoch, tokenizer=tokenizer)
    else:
        info = ocd.get_wds_dataset(args, _pixels, is_train=True, epoch=epoch, tokenizer=tokenizer)
    info.set_epoch(epoch)
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest()[:12]
            for images, _ in info.dataloader for image in images]


def test_open_clip_sample_shuffle_follows_seed_and_epoch(toy):
    originals = {name: getattr(ocd, name) for name in SEEDED_DATA_GLOBALS}
    args = clip_args(toy["reg"])
    first = sample_order(args, epoch=0)
    assert {name: getattr(ocd, name) for name in SEEDED_DATA_GLOBALS} == originals  # restored on exit
    assert len(first) == 64 and len(set(first)) == 64
    assert sample_order(args, epoch=0) == first
    assert sample_order(args, epoch=1) != first and sorted(sample_order(args, epoch=1)) == sorted(first)
    assert sample_order(clip_args(toy["reg"], seed=1), epoch=0) != first
    # open_clip alone draws its sample shuffle from the clock: two identical builds disagree
    assert sample_order(args, epoch=0, seeded=False) != sample_order(args, epoch=0, seeded=False)


def test_resampled_shards_follow_seed(toy):
    # (open_clip alone seeds ResampledShards2 from the DataLoader worker seed, or without workers from the rank)
    two_sources = f"{toy['reg']}::{toy['other_reg']}"
    args = clip_args(two_sources, dataset_resampled=True, train_data_upsampling_factors="1::3")
    first = sample_order(args, epoch=0)
    assert sample_order(args, epoch=0) == first
    assert sample_order(args, epoch=1) != first
    assert sample_order(clip_args(two_sources, seed=5, dataset_resampled=True,
                                  train_data_upsampling_factors="1::3"), epoch=0) != first


def common_args(toy, logs, name, seed):
    return ["--model", "po-tiny", "--pretrained", toy["pretrained"], "--train-num-samples", "64",
            "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--wd", "0", "--warmup", "1",
            "--precision", "fp32", "--workers", "1", "--seed", str(seed), "--dist-backend", "gloo",
            "--logs-dir", str(logs), "--name", name, "--log-every-n-steps", "1"]


def run_losses(toy, tmp_path, name, seed, *extra) -> dict:
    run_single_node([*common_args(toy, tmp_path / "logs", name, seed), *extra], tmp_path / name, nproc=2)
    records = probe_records(tmp_path / name)
    assert sorted(records) == [0, 1]
    return {rank: losses_by_epoch([r for r in rs if "loss" in r]) for rank, rs in records.items()}


@pytest.mark.slow
@pytest.mark.integration
def test_po_runs_with_the_same_seed_repeat_step_for_step(toy, tmp_path):
    po = ["--po-loss", "dpo", "--train-data", toy["pref"], "--po-reg-data", toy["reg"], "--po-reg-num-samples", "64"]
    a = run_losses(toy, tmp_path, "a", 0, *po)
    b = run_losses(toy, tmp_path, "b", 0, *po)
    assert [len(a[0][e]) for e in (0, 1)] == [4, 4]
    assert a == b  # bit for bit, every rank, both epochs


@pytest.mark.slow
@pytest.mark.integration
def test_plain_clip_training_through_the_seam_is_seeded(toy, tmp_path):
    plain = ["--train-data", toy["reg"], "--dataset-type", "webdataset"]
    a = run_losses(toy, tmp_path, "a", 0, *plain)
    b = run_losses(toy, tmp_path, "b", 0, *plain)
    c = run_losses(toy, tmp_path, "c", 1, *plain)
    assert [len(a[0][e]) for e in (0, 1)] == [4, 4]
    assert a == b
    assert a[0][1] != c[0][1]  # the seed reaches the data order
    log = (tmp_path / "logs" / "a" / "out.log").read_text()
    assert "contrastive_loss" in log and "po_loss: None" in log
