"""Faults a multi-GPU run meets, on CPU with gloo: uneven data across ranks, data that yields nothing, flags
that something else would make inert, files that are not what they claim, and runs killed and resumed."""
from __future__ import annotations

import io
import logging
import re
import tarfile
from pathlib import Path

import pytest
import torch

import open_clip_train.main as ocm
from open_clip_po.checkpoint import RNG_KEY, load_checkpoint
from open_clip_po.trainer.seam import main, patched_open_clip_train
from train_helpers import base_args, make_toy, run_cli, run_in_process

pytestmark = [pytest.mark.integration]


def corrupt_images(shard: Path, count: int) -> None:
    """Replace the first ``count`` images of a shard with bytes no decoder reads (the tar stays valid)."""
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    done = 0
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith(".png") and done < count:
                data, done = b"not an image" * 8, done + 1
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    assert done == count


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """4 shards of 24; the first loses 9 images, so the rank that reads it has fewer batches than the others."""
    toy = make_toy(tmp_path_factory.mktemp("uneven"), num_samples=96, per_shard=24)
    corrupt_images(Path(toy["root"], "shards", "pref-000000.tar"), 9)
    return toy


def skipped_total(log: str) -> int:
    found = re.findall(r"bad samples skipped \(end of training, all ranks\): .*?run total: (.*)", log)
    assert found, "no end-of-training skip summary in the log"
    return int(re.search(r"sum (\d+)", found[-1]).group(1)) if "sum" in found[-1] else 0


@pytest.mark.slow
@pytest.mark.parametrize("nproc,candidates", [(2, "batch"), (2, "classes"), (4, "batch")])
def test_ranks_with_uneven_batches_end_the_epoch_together(uneven, tmp_path, nproc, candidates):
    extra = ["--po-candidates", candidates, "--po-classnames", uneven["classnames"], "--batch-size", "4",
             "--accum-freq", "2"]
    proc = run_cli(base_args(uneven, tmp_path, "uneven", "--po-loss", "dpo", *extra, epochs=1), nproc=nproc,
                   timeout=420)  # a hang is this timeout, i.e. a failure
    log = (tmp_path / "uneven" / "out.log").read_text()
    steps = re.findall(r"Train Epoch: 0 done: (\d+)/(\d+) optimizer steps; samples trained on per rank: \[(.*)\]",
                       log)
    assert len(steps) == 1, proc.stderr[-2000:]
    done, planned, per_rank = int(steps[0][0]), int(steps[0][1]), [int(x) for x in steps[0][2].split(",")]
    assert len(per_rank) == nproc and len(set(per_rank)) == 1  # every rank stopped at the same micro-batch
    assert 0 < done < planned  # the short rank ended the epoch early for all
    assert per_rank[0] == done * 4 * 2
    assert skipped_total(log) == 9  # counted once, summed over ranks
    assert load_checkpoint(tmp_path / "uneven" / "checkpoints" / "epoch_1.pt")["epoch"] == 1


@pytest.mark.slow
def test_an_epoch_without_a_step_is_an_error_naming_the_data(tmp_path):
    toy = make_toy(tmp_path / "data", num_samples=16, per_shard=16)
    corrupt_images(Path(toy["root"], "shards", "pref-000000.tar"), 16)
    proc = run_cli(base_args(toy, tmp_path, "empty", "--po-loss", "dpo", epochs=1), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("open_clip_po.main: error: epoch 0 made no optimizer step: --train-data ")
    assert toy["pref"] in last
    assert not (tmp_path / "empty" / "checkpoints" / "epoch_1.pt").exists()


def test_start_up_errors_are_one_line(tmp_path):
    toy = {"pretrained": str(tmp_path / "start.pt"), "pref": str(tmp_path / "p.tar"), "reg": str(tmp_path / "r.tar")}
    (tmp_path / "start.pt").write_text('{"not": "a checkpoint"}')
    no_reg = base_args(toy, tmp_path, "x")  # the same run without D_reg's two flags
    for flag in ("--po-reg-data", "--po-reg-num-samples"):
        i = no_reg.index(flag)
        del no_reg[i:i + 2]
    cases = [
        (no_reg + ["--po-loss", "dpo", "--po-reg-lambda", "0.5"], "--po-reg-lambda need(s) --po-reg-data"),
        (no_reg + ["--po-loss", "dpo", "--po-reg-kl", "reverse"], "--po-reg-kl need(s) --po-reg-data"),
        (base_args(toy, tmp_path, "x", "--po-loss", "dpo") + ["--model", "po-tin"],
         "--model 'po-tin' is not a known open_clip model (nearest: po-tiny"),
        (base_args(toy, tmp_path, "x", "--po-loss", "dpo", "--po-linear-head", "--po-ref-sync-steps", "2"),
         "--po-ref-sync-steps cannot follow a linear head"),
        (base_args(toy, tmp_path, "x", "--po-loss", "dpo", "--po-head-towers", "image"),
         "--po-head-towers is for --po-linear-head"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        text = str(exc.value.code)
        assert text.startswith("open_clip_po.main: error:") and message in text and "\n" not in text, text


@pytest.mark.slow
def test_a_pretrained_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path):
    toy = make_toy(tmp_path / "data", num_samples=16, per_shard=16)
    bad = tmp_path / "weights.pt"
    bad.write_text('{"not": "a checkpoint"}')
    toy["pretrained"] = str(bad)
    with pytest.raises(SystemExit) as exc:
        main(base_args(toy, tmp_path, "x", "--po-loss", "dpo", epochs=1))
    text = str(exc.value.code)
    assert text.startswith(f"open_clip_po.main: error: --pretrained: cannot read checkpoint {bad}: a JSON/text file")
    assert "\n" not in text


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_equals_the_unbroken_run(tmp_path):
    # random crops (not the helpers' whole-image crop) and BMA: the resumed run must repeat the same draws
    toy = make_toy(tmp_path / "data", num_samples=64, per_shard=32)
    extra = ["--po-loss", "dpo", "--po-average", "bma", "--aug-cfg", "scale=(0.5, 1.0)", "--batch-size", "8"]
    run_in_process(base_args(toy, tmp_path, "straight", *extra, epochs=3))

    class Killed(Exception):
        pass

    argv = base_args(toy, tmp_path, "resumed", *extra, epochs=3)
    with pytest.raises(Killed), patched_open_clip_train() as session:
        real_parse = session.parse_args

        def parse_then_arm(a):
            args = real_parse(a)
            real_good_step = session.hooks.good_step

            def good_step(step):
                real_good_step(step)
                if step == 8 + 3:  # epoch 1, fourth step: after epoch 1's checkpoint, before epoch 2's
                    raise Killed
            session.hooks.good_step = good_step
            return args
        ocm.parse_args = parse_then_arm
        ocm.main(argv)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch_latest.pt")["epoch"] == 1
    run_in_process(argv + ["--resume", "latest"])

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch_3.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch_3.pt")
    assert len(a[RNG_KEY]) == 1
    for name, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], value), name
    for name, value in a["po_average"]["state_dict"].items():
        assert torch.equal(b["po_average"]["state_dict"][name], value), name


@pytest.mark.slow
def test_a_checkpoint_in_the_earlier_format_still_resumes(tmp_path, caplog):
    # the format before RNG states were saved: open_clip's keys, the head and the average outside state_dict
    toy = make_toy(tmp_path / "data", num_samples=32, per_shard=16)
    argv = base_args(toy, tmp_path, "old", "--po-loss", "dpo", "--po-linear-head", "--po-average", "ema",
                     "--batch-size", "8", epochs=1)
    run_in_process(argv)
    path = tmp_path / "old" / "checkpoints" / "epoch_latest.pt"
    ckpt = load_checkpoint(path)
    earlier = {k: v for k, v in ckpt.items() if k not in (RNG_KEY, "po_objective", "po_reference")}
    assert set(earlier) >= {"epoch", "name", "state_dict", "optimizer", "po_head", "po_average"}
    torch.save(earlier, path)
    run_in_process(base_args(toy, tmp_path, "old", "--po-loss", "dpo", "--po-linear-head", "--po-average", "ema",
                             "--batch-size", "8", "--resume", "latest", epochs=2))
    resumed = load_checkpoint(tmp_path / "old" / "checkpoints" / "epoch_2.pt")
    assert resumed["epoch"] == 2 and resumed["po_average"]["state"]["num_updates"] == 8
    assert not torch.equal(resumed["po_head"]["weight"], ckpt["po_head"]["weight"])
    assert "the checkpoint has no RNG states" in caplog.text


@pytest.mark.slow
def test_resume_latest_passes_over_svd_scale_outputs_and_says_so(tmp_path, caplog):
    from open_clip_po.surgery.cli import main as svd_main

    toy = make_toy(tmp_path / "data", num_samples=32, per_shard=16)
    argv = base_args(toy, tmp_path, "head", "--po-loss", "dpo", "--po-linear-head", "--batch-size", "8", epochs=1)
    argv.remove("--save-most-recent")  # then open_clip's latest-finder picks the file, from checkpoints/ and below
    run_in_process(argv)
    checkpoints = tmp_path / "head" / "checkpoints"
    # the default output goes beside checkpoints/, where the finder does not look
    assert svd_main([str(checkpoints / "epoch_1.pt"), "--t", "0.5"]) == 0
    assert (tmp_path / "head" / "svd_scale" / "epoch_1.t0.5.pt").is_file()
    # outputs put into checkpoints/ by hand sort after epoch_1.pt: they are passed over, with a log line each
    for extra in (["--t", "0.5", "--keep-head"], ["--t", "-2"]):
        name = "epoch_1.t0.5.head.pt" if "--keep-head" in extra else "epoch_1.t-2.pt"
        assert svd_main([str(checkpoints / "epoch_1.pt"), *extra, "--out", str(checkpoints / name)]) == 0
    caplog.set_level(logging.INFO)
    resume = [a if a != "1" or argv[i - 1] != "--epochs" else "2" for i, a in enumerate(argv)]
    run_in_process(resume + ["--resume", "latest"])
    passed_over = [r.getMessage() for r in caplog.records if "--resume latest: passing over" in r.getMessage()]
    assert len(passed_over) == 2
    assert all("not a training checkpoint (it was written by svd_scale" in m for m in passed_over)
    assert f"Found latest resume checkpoint at {checkpoints / 'epoch_1.pt'}" in caplog.text
    assert load_checkpoint(checkpoints / "epoch_2.pt")["epoch"] == 2
    # given by name, an svd_scale output is refused with one line saying what it is and what to do
    with pytest.raises(SystemExit) as exc:
        main(resume + ["--name", "other", "--resume", str(checkpoints / "epoch_1.t-2.pt")])
    text = str(exc.value.code)
    assert text == (f"open_clip_po.main: error: --resume {checkpoints / 'epoch_1.t-2.pt'} is not a training "
                    f"checkpoint: it was written by svd_scale (t = -2.0, from {checkpoints / 'epoch_1.pt'}) and holds "
                    "no optimizer state; to start from its weights, give it as --pretrained")


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["pref-000000.tar", "pref-000001.tar"])  # read by one rank or the other
def test_with_two_ranks_the_strict_data_error_is_the_last_thing_torchrun_prints(tmp_path, shard):
    toy = make_toy(tmp_path / "data", num_samples=32, per_shard=16)
    corrupt_images(Path(toy["root"], "shards", shard), 1)
    proc = run_cli(base_args(toy, tmp_path, "strict", "--po-loss", "dpo", "--po-strict-data", "--batch-size", "4",
                             epochs=1), nproc=2, check=False, timeout=420)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert set(lines[-1]) == {"="}, lines[-5:]  # torchrun's ChildFailedError summary ends the output ...
    root_cause = "\n".join(lines[lines.index("Root Cause (first observed failure):"):])
    # ... and its root cause, its last line, is the one line (not "To enable traceback see: ...")
    expected = (f"  traceback : open_clip_po.main: error: bad sample (corrupt_image) in shard "
                f"{Path(toy['root'], 'shards', shard)}, key ")
    assert lines[-2].startswith(expected) and lines[-2].endswith("[--po-strict-data]"), root_cause
    assert not (tmp_path / "strict" / "checkpoints" / "epoch_1.pt").exists()


def test_a_strict_data_error_in_one_process_is_one_line(tmp_path):
    toy = make_toy(tmp_path / "data", num_samples=16, per_shard=16)
    corrupt_images(Path(toy["root"], "shards", "pref-000000.tar"), 1)
    with pytest.raises(SystemExit) as exc:  # the bad sample is met in a DataLoader worker (--workers 1)
        main(base_args(toy, tmp_path, "strict", "--po-loss", "dpo", "--po-strict-data", "--batch-size", "4",
                       epochs=1))
    text = str(exc.value.code)
    assert text.startswith(f"open_clip_po.main: error: bad sample (corrupt_image) in shard {toy['pref'].split('{')[0]}")
    assert text.endswith("[--po-strict-data]") and "\n" not in text and "Traceback" not in text


def test_a_missing_logger_is_named_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(ocm, "tensorboard", None)  # as open_clip sees it without the package
    toy = {"pretrained": str(tmp_path / "start.pt"), "pref": str(tmp_path / "p.tar"), "reg": str(tmp_path / "r.tar")}
    with pytest.raises(SystemExit) as exc:
        main(base_args(toy, tmp_path, "tb", "--po-loss", "dpo", "--report-to", "tensorboard"))
    assert str(exc.value.code) == ("open_clip_po.main: error: --report-to tensorboard needs tensorboard, not installed "
                                   "(pip install 'open-clip-po[tensorboard]'); nothing was started")
    assert not (tmp_path / "tb").exists()  # no half-made run folder blocks the same --name later


def test_a_head_checkpoint_says_open_clip_leaves_the_head_out_and_our_loaders_warn(tmp_path, caplog):
    import open_clip
    from open_clip_po.checkpoint import HEAD_NOTE_KEY, CheckpointCodec, atomic_save, dropped_head_warning
    from open_clip_po.head import attach_linear_head
    from open_clip_po.trainer.model_setup import ModelSetup

    model = open_clip.create_model("po-tiny")
    attach_linear_head(model)
    ckpt = CheckpointCodec(linear_head=True).encode({"epoch": 1, "name": "x", "state_dict": model.state_dict()})
    path = atomic_save(ckpt, tmp_path / "epoch_1.pt")
    note = load_checkpoint(path)[HEAD_NOTE_KEY]  # for whoever opens the file: stock open_clip cannot warn
    assert "stock open_clip does not load" in note and "python -m open_clip_po.svd_scale" in note
    assert dropped_head_warning(tmp_path / "start.pt", "--pretrained") is None  # not a file: nothing to say
    caplog.set_level(logging.WARNING)
    ModelSetup(lambda: None, open_clip.create_model_and_transforms)._create_checked("po-tiny", str(path),
                                                                                    "--pretrained")
    assert (f"--pretrained {path} holds a linear head (po_head) that open_clip leaves out: the model starts from the "
            f"towers without W. To start from the head's model, fold it first: python -m open_clip_po.svd_scale "
            f"{path} --t 1") in caplog.text
