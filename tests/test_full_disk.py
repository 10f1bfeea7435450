"""A full disk is named: every write that meets one (checkpoints, the reference cache, shards, result files)
ends in one line saying what was being written, where, how much space it needed and how much is free — and the
file it was replacing, e.g. the last checkpoint, is intact and resumable.

Two ways to fill a disk: a patched writer (always), and a small tmpfs mounted for the test (needs root and a
kernel that lets this container mount; skipped with the reason otherwise).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from open_clip_po import atomic
from open_clip_po.atomic import DiskFullError, write_json
from open_clip_po.checkpoint import atomic_save, load_checkpoint
from open_clip_po.data.shards import ShardWriter
from open_clip_po.trainer.hooks import TrainingHooks
from open_clip_po.trainer.seam import main
from train_helpers import base_args, make_toy, run_in_process

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 15775360 vs 15775252"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of ``size`` bytes at a fresh folder: ``small_disk(size)`` → its path; unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'mount failed'}); the patched-"
                        "writer tests cover the same code")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file that leaves ``leave`` bytes free on ``disk``."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*.tmp")]


# ---------------------------------------------------------------- patched writers


def test_an_atomic_write_that_meets_enospc_names_file_size_and_free_space(tmp_path, monkeypatch):
    target = tmp_path / "results" / "zeroshot.json"
    write_json({"top1": 0.5}, target)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 1234)
    with pytest.raises(DiskFullError) as exc:
        write_json({"top1": 0.75, "rows": list(range(1000))}, target)
    message = str(exc.value)
    assert message.startswith(f"cannot write file {target}: no space left on device; it needs about ")
    assert "1.2 kB free on /" in message and "\n" not in message
    assert json.loads(target.read_text()) == {"top1": 0.5}  # the earlier file is unchanged
    assert no_temp_files(tmp_path)


def test_torchs_serialization_error_on_a_full_disk_is_named(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "epoch_1.pt"
    atomic_save({"epoch": 0, "state_dict": {"w": torch.zeros(4)}}, target)

    def failing_save(obj, f):
        f.write(b"PK" * 1000)
        raise RuntimeError(TORCH_FULL_DISK)
    monkeypatch.setattr(torch, "save", failing_save)
    weights = {"epoch": 1, "state_dict": {"w": torch.zeros(1000, 1000)}}
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 2_000_000)  # less than the 4 MB it needs: a full disk
    with pytest.raises(DiskFullError, match=rf"^cannot write checkpoint {target}: no space left on device; it needs "
                                            r"about 4\.0 MB, 2\.0 MB free on /"):
        atomic_save(weights, target)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 10**12)  # plenty free: say what torch said
    with pytest.raises(DiskFullError, match=r"torch's file writer failed \(\[enforce fail at inline_container.cc:672\] "
                                            r"\. unexpected pos 15775360 vs 15775252\): a full disk or quota\?"):
        atomic_save(weights, target)
    monkeypatch.undo()
    assert load_checkpoint(target)["epoch"] == 0 and no_temp_files(tmp_path)


def test_a_shard_build_that_meets_a_full_disk_publishes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "shards"
    with ShardWriter(out, "pref") as writer:
        writer.write("a", {"txt": b"first build"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_open = os.fdopen

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullFile(real_open(fd, mode)))
    with pytest.raises(DiskFullError, match=rf"^cannot write shard {out}/pref-000000.tar: no space left on device; "
                                            r"it needs more than the 1\.0 kB written when the disk filled"):
        with ShardWriter(out, "pref") as writer:
            writer.write("b", {"txt": b"second build"})
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".build.lock"}  # (released: empty)
    assert after == before  # the earlier set, as it was
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # no staging folder left behind


# ---------------------------------------------------------------- a real full disk (tmpfs)


@pytest.mark.slow
@pytest.mark.integration
def test_training_into_a_full_disk_names_it_and_resumes_from_the_intact_checkpoint(tmp_path, small_disk,
                                                                                   monkeypatch):
    toy = make_toy(tmp_path / "data", num_samples=32, per_shard=16)
    logs = small_disk(160 << 20)  # a po-tiny checkpoint with Adam's state is ~41 MB; each epoch writes two
    argv = base_args(toy, logs, "full", "--po-loss", "dpo", epochs=2)
    real_end = TrainingHooks.end_of_epoch

    def end_of_epoch_then_fill(self, epoch):
        real_end(self, epoch)
        if epoch == 1:  # the disk fills during the second epoch, before its checkpoints
            fill(logs, leave=256 << 10)
    monkeypatch.setattr(TrainingHooks, "end_of_epoch", end_of_epoch_then_fill)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    monkeypatch.undo()
    checkpoints = logs / "full" / "checkpoints"
    line = str(exc.value.code)
    assert "\n" not in line
    assert line.startswith(f"open_clip_po.main: error: cannot write checkpoint {checkpoints / 'epoch_2.pt'}: no "
                           "space left on device; it needs about 4")
    assert f"free on {logs}" in line
    assert line.endswith(f"the last checkpoint, {checkpoints / 'epoch_latest.pt'}, is intact: free space and run "
                         "again with --resume latest")
    assert load_checkpoint(checkpoints / "epoch_latest.pt")["epoch"] == 1 and no_temp_files(checkpoints)
    (logs / "filler").unlink()
    run_in_process(argv + ["--resume", "latest"])
    run_in_process(base_args(toy, tmp_path, "unbroken", "--po-loss", "dpo", epochs=2))
    resumed = load_checkpoint(checkpoints / "epoch_2.pt")
    unbroken = load_checkpoint(tmp_path / "unbroken" / "checkpoints" / "epoch_2.pt")
    for name, value in unbroken["state_dict"].items():  # nothing lost: the same weights as a run never stopped
        assert torch.equal(resumed["state_dict"][name], value), name


@pytest.mark.slow
@pytest.mark.integration
def test_a_reference_cache_build_into_a_full_disk_is_one_line_and_resumes(tmp_path, small_disk, capsys):
    from open_clip_po.ref_cache.build import main as build_main
    from test_ref_cache import cache_argv

    toy = make_toy(tmp_path / "data", num_samples=64, per_shard=32)
    disk = small_disk(8 << 20)
    out = disk / "cache"
    filler = fill(disk, leave=16 << 10)  # room for one shard's features (~9 kB, 3 pages), not two
    assert build_main(cache_argv(toy, out)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"python -m open_clip_po.ref_cache: error: cannot write reference-cache file {out}/shards/")
    assert "no space left on device; it needs about " in last and f"free on {disk}" in last
    written = sorted(p.name for p in (out / "shards").iterdir())
    assert written and no_temp_files(out)  # the shards done before the disk filled are kept
    stamps = {name: (out / "shards" / name).stat().st_mtime_ns for name in written}
    filler.unlink()
    assert build_main(cache_argv(toy, out)) == 0
    assert all((out / "shards" / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert json.loads((out / "manifest.json").read_text())["format"] == 2


@pytest.mark.integration
def test_svd_scale_into_a_full_disk_is_one_line_and_keeps_its_input(tmp_path, small_disk, capsys):
    from open_clip_po.surgery.cli import main as svd_main

    torch.manual_seed(0)
    source = tmp_path / "epoch_1.pt"
    atomic_save({"epoch": 1, "state_dict": {"visual.proj": torch.randn(8, 8), "text_projection": torch.randn(8, 8)},
                 "po_head": {"weight": torch.eye(8) + 0.1 * torch.randn(8, 8)}}, source)
    before = source.read_bytes()
    disk = small_disk(1 << 20)
    fill(disk, leave=512)
    assert svd_main([str(source), "--t", "0.5", "--keep-head", "--out", str(disk / "scaled.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"open-clip-po-svd-scale: error: cannot write checkpoint {disk / 'scaled.pt'}: no space "
                        rf"left on device; it needs about 768 B, \d+ B free on {disk}; nothing was written there "
                        r"\(an earlier file of that name is unchanged\)", err), err
    assert source.read_bytes() == before and not (disk / "scaled.pt").exists()


@pytest.mark.integration
def test_a_shard_builder_into_a_full_disk_is_one_line_and_keeps_the_previous_set(tmp_path, small_disk, capsys):
    from data_helpers import make_image_folder
    from open_clip_po.data.typographic import main as typographic_main

    images = make_image_folder(tmp_path / "images", per_class=4)
    disk = small_disk(4 << 20)
    out = disk / "shards"
    argv = ["--images", str(images), "--out", str(out), "--image-size", "32", "--quiet", "--max-count", "4"]
    assert typographic_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".build.lock"}
    fill(disk, leave=16 << 10)
    assert typographic_main(argv + ["--image-size", "48"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write (shard|file) {out}/\S+: no space left on device; .* free on {disk}; "
                        r"nothing was written there \(an earlier file of that name is unchanged\)", last), last
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".build.lock"} == before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "shards"]  # no staging folder left


def test_a_full_disk_met_by_a_write_that_is_not_ours_is_named_too(tmp_path):
    from types import SimpleNamespace

    from open_clip_po.trainer.failures import one_line

    run = tmp_path / "run"
    args = SimpleNamespace(logs=str(tmp_path), name="run", checkpoint_path=str(run / "checkpoints"),
                           save_most_recent=False)
    # open_clip's own params.txt (a plain open()): named, but not claimed intact
    line = one_line(OSError(errno.ENOSPC, "No space left on device", str(run / "params.txt")), args)
    assert line.startswith(f"cannot write file {run / 'params.txt'}: no space left on device; its size is unknown, ")
    assert "unchanged" not in line
    # a checkpoint of a run that has none yet
    (run / "checkpoints").mkdir(parents=True)
    full = atomic.disk_full_error(OSError(errno.ENOSPC, "No space"), run / "checkpoints" / "epoch_1.pt", "checkpoint",
                                  needed=10)
    assert one_line(full, args).endswith("; no earlier checkpoint of this run: free space and run again with "
                                         "--resume latest")
