"""Shard builds are locked and published whole: concurrent builders, builders killed anywhere, stale leftovers,
and the readers' refusal of unfinished sets and of patterns that match nothing."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data_helpers import (make_image_folder, pixels, po_args, read_epoch, tokenizer,  # noqa: F401 (a fixture)
                          triplet, write_tar)

TIMEOUT = 120  # seconds a builder may take to reach its stop; the test fails rather than hangs
BUILD = dict(image_size=16, image_format="png", max_count=4, quiet=True)  # 12 images: 3 + 3 shards


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """An image folder and two complete builds of it with different seeds (different attacks)."""
    from open_clip_po.data.typographic import build_typographic

    root = tmp_path_factory.mktemp("safety")
    images = make_image_folder(root / "images")
    for seed in (0, 1):
        build_typographic(images, root / f"seed{seed}", seed=seed, **BUILD)
    return images, root / "seed0", root / "seed1"


def _stopping_build(out, images, seed, stop_at, signal_file, go_file):
    """A typographic build (in a forked process) that stops at ``stop_at``: ``encode:K`` (before rendering the
    K-th image: a shard is half written), ``shard:N`` (right after the N-th finished shard),
    ``before_publish``/``after_publish`` (around the swap that publishes the set). At the stop it creates
    ``signal_file`` and waits for ``go_file`` (or for SIGKILL)."""
    from open_clip_po.data import publish, shards, typographic

    kind, _, n = stop_at.partition(":")
    calls = [0]

    def stopping(original, after):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            stop = calls[0] == int(n or 1)
            if stop and not after:
                signal_file.touch()
                while not go_file.exists():
                    time.sleep(0.02)
            result = original(*args, **kwargs)
            if stop and after:
                signal_file.touch()
                while not go_file.exists():
                    time.sleep(0.02)
            return result
        return wrapper

    if kind == "encode":
        typographic._attack_one = stopping(typographic._attack_one, after=False)
    elif kind == "shard":
        shards.ShardWriter._finish = stopping(shards.ShardWriter._finish, after=True)
    else:
        publish.exchange_folders = stopping(publish.exchange_folders, after=kind == "after_publish")
    typographic.build_typographic(images, out, seed=seed, **BUILD)


def _start(out, images, seed, stop_at, tmp_path):
    """The stopping build in a forked process (cheap: no new interpreter), once it has reached its stop."""
    signal_file, go_file = tmp_path / "stopped", tmp_path / "go"
    proc = mp.get_context("fork").Process(target=_stopping_build,
                                          args=(out, images, seed, stop_at, signal_file, go_file))
    proc.start()
    deadline = time.monotonic() + TIMEOUT
    while not signal_file.exists():
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"builder never reached {stop_at} (exit code {proc.exitcode})")
        time.sleep(0.02)
    return proc, go_file


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL


def _files(folder) -> dict[str, bytes]:
    """The published set: every visible file (the lock file is the builder's, not the set's)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if not p.name.startswith(".")}


def _real_counts(folder) -> dict[str, int]:
    counts = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            counts[shard.name] = len({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return counts


def _check_complete_set(folder, tokenizer):
    """sizes.json and the manifest tell the truth, and training's reader reads every triplet exactly once."""
    from open_clip_po.data import get_po_data

    sizes = json.loads((folder / "sizes.json").read_text())
    assert sizes == _real_counts(folder)
    manifest = json.loads((folder / "build.json").read_text())
    assert manifest["files"] == {name: len(data) for name, data in _files(folder).items() if name != "build.json"}
    info = get_po_data(po_args(train_data=str(folder / "pref-*.tar"), batch_size=1), (pixels, pixels),
                       tokenizer=tokenizer)["train"]
    batches = read_epoch(info)
    assert len(batches) == sum(v for k, v in sizes.items() if k.startswith("pref-")) == 12
    assert all(b["skipped"] == {} for b in batches)


def test_a_second_builder_refuses_and_the_first_completes(sets, tmp_path, tokenizer, capsys):
    from open_clip_po.atomic import this_host
    from open_clip_po.data import typographic

    images, _, seed1 = sets
    out = tmp_path / "out"
    first, go = _start(out, images, 1, "shard:2", tmp_path)  # holding the lock, two shards written
    capsys.readouterr()
    assert typographic.main(["--images", str(images), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"being built by PID {first.pid} on host {this_host()}" in err
    go.touch()
    first.join(timeout=TIMEOUT)
    assert first.exitcode == 0
    assert _files(out) == _files(seed1)
    _check_complete_set(out, tokenizer)


@pytest.mark.parametrize("stop_at", ["encode:6", "shard:2", "before_publish", "after_publish"])
def test_a_rebuild_killed_anywhere_leaves_the_old_or_the_new_set(sets, tmp_path, tokenizer, stop_at, caplog):
    from open_clip_po.data.typographic import build_typographic

    images, seed0, seed1 = sets
    old, new = _files(seed0), _files(seed1)
    assert old != new  # other attacks
    out = tmp_path / "out"
    shutil.copytree(seed0, out)
    proc, _ = _start(out, images, 1, stop_at, tmp_path)
    _kill(proc)
    assert _files(out) == (new if stop_at == "after_publish" else old)
    _check_complete_set(out, tokenizer)

    # The next build takes the dead builder's lock over, clears its leftovers and publishes the new set.
    with caplog.at_level(logging.INFO):
        build_typographic(images, out, seed=1, **BUILD)
    assert _files(out) == new
    assert [p.name for p in tmp_path.iterdir() if ".staging-" in p.name] == []
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    if stop_at != "after_publish":  # after the swap, the dead builder's lock file left with the old set
        assert any(f"from PID {proc.pid}" in r.getMessage() for r in caplog.records)


def test_a_killed_rebuild_of_a_folder_without_manifest_leaves_it_readable(sets, tmp_path, tokenizer):
    images, seed0, _ = sets
    out = tmp_path / "out"
    shutil.copytree(seed0, out)
    (out / "build.json").unlink()  # as written by another tool, or by builders before manifests existed
    before = _files(out)
    _kill(_start(out, images, 1, "shard:2", tmp_path)[0])
    assert _files(out) == before
    from open_clip_po.data import get_po_data

    info = get_po_data(po_args(train_data=str(out / "pref-*.tar"), batch_size=1), (pixels, pixels),
                       tokenizer=tokenizer)["train"]
    assert len(read_epoch(info)) == 12


def test_a_first_build_killed_is_refused_by_training_and_evaluation(sets, tmp_path, tokenizer):
    from open_clip_po.data import IncompleteBuildError, get_po_data
    from open_clip_po.eval import EvalError
    from open_clip_po.eval.data import open_eval_sets

    out = tmp_path / "out"
    _kill(_start(out, sets[0], 0, "shard:3", tmp_path)[0])
    with pytest.raises(IncompleteBuildError, match=r"unfinished build .*run the builder again with --out"):
        get_po_data(po_args(train_data=str(out / "pref-{000000..000002}.tar")), (pixels, pixels),
                    tokenizer=tokenizer)
    with pytest.raises(EvalError, match="unfinished build"):
        open_eval_sets(str(out / "reg-*.tar"), pixels, classnames=["a", "b", "c"])


def test_shards_changed_after_their_build_are_refused(sets, tmp_path, tokenizer):
    from open_clip_po.data import IncompleteBuildError, get_po_data

    out = tmp_path / "out"
    shutil.copytree(sets[1], out)
    write_tar(out / "pref-000001.tar", [("k", triplet(0, "w", "l"))])  # a shard from elsewhere
    with pytest.raises(IncompleteBuildError, match=r"pref-000001\.tar is not the shard that .*build\.json lists"):
        get_po_data(po_args(train_data=str(out / "pref-*.tar")), (pixels, pixels), tokenizer=tokenizer)


def test_a_rebuild_keeps_other_sets_in_the_folder(sets, tmp_path):
    from open_clip_po.data.pairs import build_pairs

    images, seed0, _ = sets
    out = tmp_path / "out"
    shutil.copytree(seed0, out)
    typographic = _files(out)
    build_pairs(images, out, image_size=16, prefix="clean", max_count=100, quiet=True)
    files = _files(out)
    assert {k: v for k, v in files.items() if k.startswith(("pref-", "reg-"))} == \
        {k: v for k, v in typographic.items() if k.startswith(("pref-", "reg-"))}
    assert json.loads(files["sizes.json"]) == _real_counts(out) and "clean-000000.tar" in files
    (out / "sub").mkdir()
    with pytest.raises(ValueError, match="holds the folder 'sub'"):
        build_pairs(images, out, quiet=True)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    from open_clip_po.atomic import atomic_path, remove_stale_temp_files, this_host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".epoch_1.pt.{dead.pid}@{this_host()}.abcd1234.tmp"
    mine = tmp_path / f".epoch_2.pt.{os.getpid()}@{this_host()}.abcd1234.tmp"
    elsewhere = tmp_path / f".epoch_3.pt.{dead.pid}@another-host.abcd1234.tmp"
    untagged = tmp_path / ".epoch_4.pt.k2j4h5g6.tmp"  # not ours to judge: no writer recorded
    for path in (stale, mine, elsewhere, untagged):
        path.write_bytes(b"partial")
    with atomic_path(tmp_path / "being_written.pt") as writing:
        writing.write_bytes(b"x")
        assert remove_stale_temp_files(tmp_path) == [stale]
        assert writing.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, elsewhere.name, untagged.name, "being_written.pt"])


def test_patterns_that_match_no_file_are_named(tmp_path, tokenizer):
    from open_clip_po.data import ShardPatternError, get_po_data
    from open_clip_po.eval import EvalError
    from open_clip_po.eval.data import open_eval_sets

    for pattern in (f"{tmp_path}/nothing-{{000..002}}.tar", f"{tmp_path}/*.tar"):
        with pytest.raises(ShardPatternError, match=re.escape(f"--train-data {pattern} matches no file")):
            get_po_data(po_args(train_data=pattern, train_num_samples=96), (pixels, pixels), tokenizer=tokenizer)
    with pytest.raises(ShardPatternError, match="--po-reg-data .* matches no file"):
        write_tar(tmp_path / "p.tar", [("k", triplet(0, "w", "l"))])
        get_po_data(po_args(train_data=str(tmp_path / "p.tar"), train_num_samples=1,
                            po_reg_data=str(tmp_path / "reg-*.tar")), (pixels, pixels), tokenizer=tokenizer)
    with pytest.raises(EvalError, match="matches no file"):
        open_eval_sets(f"{tmp_path}/clean-*.tar", pixels, classnames=["a", "b"])


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_no_batch_carried_reach_the_ledger(tmp_path, tokenizer, workers):
    from open_clip_po.data import SkipLedger, get_po_data

    # One sample for batches of two: no batch at all; the missing shards are counted all the same.
    good = write_tar(tmp_path / "good.tar", [("k", triplet(0, "w", "l"))])
    pattern = "::".join([str(good), str(tmp_path / "gone-0.tar"), str(tmp_path / "gone-1.tar")])
    info = get_po_data(po_args(train_data=pattern, train_num_samples=2, batch_size=2, workers=workers),
                       (pixels, pixels), tokenizer=tokenizer)["train"]
    ledger = SkipLedger()
    ledger.watch(info.dataloader)
    assert read_epoch(info) == []
    assert ledger.log(epoch=0)["unreadable_shard"] == 2
    assert ledger.log()["unreadable_shard"] == 2  # counted once
