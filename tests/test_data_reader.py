"""The triplet reader: exactly-once epochs across workers and ranks, hand-written shards, bad-sample accounting."""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from data_helpers import (image_bytes, make_image_folder, pixel_key, pixels, po_args, read_epoch, shard_contents,
                          tokenizer, triplet, write_tar)  # noqa: F401  (tokenizer: a fixture)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 triplets in 4 shards of 6 and 12 clean pairs in 2 shards, 16x16 png."""
    from open_clip_po.data.typographic import build_typographic

    root = tmp_path_factory.mktemp("reader")
    images = make_image_folder(root / "images")
    build_typographic(images, root / "out", per_image=2, image_size=16, image_format="png", max_count=6, quiet=True)
    return root / "out"


def _load(args, tokenizer):
    from open_clip_po.data import get_po_data

    return get_po_data(args, (pixels, pixels), tokenizer=tokenizer)["train"]


def _rows(batches):
    for b in batches:
        for image, chosen, rejected in zip(b["images"], b["chosen"], b["rejected"]):
            yield pixel_key(image), chosen, rejected


@pytest.mark.parametrize("workers,world_size", [(2, 1), (0, 2), (2, 2)])
def test_every_triplet_exactly_once_per_epoch(shards, tokenizer, workers, world_size):
    expected = shard_contents(sorted(shards.glob("pref-*.tar")))
    assert len(expected) == 24
    loaders = [_load(po_args(train_data=str(shards / "pref-{000000..000003}.tar"), batch_size=3, workers=workers,
                             world_size=world_size, rank=rank), tokenizer) for rank in range(world_size)]
    orders = []
    for epoch in (0, 1):
        seen, order = Counter(), []
        for info in loaders:
            batches = read_epoch(info, epoch)
            assert len(batches) == info.dataloader.num_batches == 8 // world_size
            assert info.dataloader.num_samples == 24
            for key, chosen, rejected in _rows(batches):
                y_w, y_l = expected[key]
                assert torch.equal(chosen, tokenizer([y_w])[0]) and torch.equal(rejected, tokenizer([y_l])[0])
                seen[key] += 1
                order.append(key)
            assert all(b["skipped"] == {} for b in batches)
        assert seen == Counter({key: 1 for key in expected})
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_order_is_deterministic_for_a_seed_and_epoch(shards, tokenizer):
    args = po_args(train_data=str(shards / "pref-{000000..000003}.tar"), batch_size=4, seed=5)
    first = [k for k, _, _ in _rows(read_epoch(_load(args, tokenizer), 1))]
    again = [k for k, _, _ in _rows(read_epoch(_load(args, tokenizer), 1))]
    other = [k for k, _, _ in _rows(read_epoch(_load(po_args(**{**vars(args), "seed": 6}), tokenizer), 1))]
    assert first == again and first != other and sorted(first) == sorted(other)


def test_reg_stream_is_cycled_alongside_every_pref_batch(shards, tokenizer):
    reg = {}
    for path in sorted(shards.glob("reg-*.tar")):
        with tarfile.open(path) as tar:
            m = {x.name: tar.extractfile(x).read() for x in tar.getmembers()}
        for name in m:
            if name.endswith(".png"):
                key = name[:-4]
                reg[pixel_key(Image.open(io.BytesIO(m[name])))] = m[key + ".txt"].decode()
                assert json.loads(m[key + ".json"])["source"]
    assert len(reg) == 12
    args = po_args(train_data=str(shards / "pref-{000000..000003}.tar"), batch_size=3,
                   po_reg_data=str(shards / "reg-{000000..000001}.tar"), po_reg_batch_size=5)
    batches = read_epoch(_load(args, tokenizer), 0)
    assert len(batches) == 8
    seen = Counter()
    for b in batches:
        assert b["reg_images"].shape == (5, 3, 16, 16) and b["reg_texts"].shape == (5, 16)
        for image, text in zip(b["reg_images"], b["reg_texts"]):
            key = pixel_key(image)
            assert torch.equal(text, tokenizer([reg[key]])[0])
            seen[key] += 1
    # 40 reg rows from 12 samples: three full passes and part of a fourth, nothing repeated within a pass.
    assert sum(seen.values()) == 40 and set(seen) == set(reg) and min(seen.values()) >= 3


def test_hand_written_tarfile_shards(tmp_path, tokenizer):
    samples_a = [
        ("s0", triplet(0, "a photo of a cat.", "a photo of a dog.")),
        # members in another order, an upper-case extension, a jpeg, non-ASCII text
        ("s1", {"yl.txt": b"second loser", "yw.txt": "second winner \u00e9".encode(), "JPG": image_bytes(1, "JPEG")}),
        ("s2", triplet(2, "x", "y") | {"json": b'{"label": 1}'}),
    ]
    samples_b = [(f"t{i}", triplet(10 + i, f"winner {i}", f"loser {i}")) for i in range(3)]
    a, b = write_tar(tmp_path / "a.tar", samples_a), write_tar(tmp_path / "b.tar", samples_b)
    expected = {}
    for _, m in samples_a + samples_b:
        image = m.get("png") or m.get("JPG")
        expected[pixel_key(Image.open(io.BytesIO(image)))] = (m["yw.txt"].decode(), m["yl.txt"].decode())
    # No sizes.json: the sample count must be given, like open_clip's --train-num-samples.
    with pytest.raises(ValueError, match="sizes.json"):
        _load(po_args(train_data=f"{a}::{b}"), tokenizer)
    batches = read_epoch(_load(po_args(train_data=f"{a}::{b}", train_num_samples=6, batch_size=1), tokenizer))
    got = {key: (c, r) for key, c, r in _rows(batches)}
    assert len(got) == 6 == len(expected)
    for key, (y_w, y_l) in expected.items():
        assert torch.equal(got[key][0], tokenizer([y_w])[0]) and torch.equal(got[key][1], tokenizer([y_l])[0])


def _truncate(path, where):
    """Cut a shard: 'middle' = inside the image of its 2nd sample, 'boundary' = where its 3rd sample starts."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    images = [m for m in members if m.name.endswith(".png")]
    cut = images[1].offset_data + 20 if where == "middle" else images[2].offset
    data = path.read_bytes()[:cut]
    path.write_bytes(data)


def _bad_shards(tmp_path):
    good = [(f"good{i}", triplet(i, f"winner {i}", f"loser {i}")) for i in range(2)]
    bad = [
        ("no_image", {"yw.txt": b"w", "yl.txt": b"l", "txt": b"w"}),
        ("no_yw", {k: v for k, v in triplet(20, "w", "l").items() if k != "yw.txt"}),
        ("no_yl", {k: v for k, v in triplet(21, "w", "l").items() if k != "yl.txt"}),
        ("bad_utf8", triplet(22, "w", "l") | {"yw.txt": b"\xff\xfe caption"}),
        ("empty", triplet(23, "w", "l") | {"yl.txt": b"  \n "}),
        ("same", triplet(24, "a dog", "a dog")),
        ("same_tokens", triplet(25, "a cat", "A  Cat ")),  # differs as text, not as tokens
        ("cut_png", triplet(26, "w", "l") | {"png": image_bytes(26)[:60]}),
        ("garbage_jpg", {"jpg": b"not an image", "yw.txt": b"w", "yl.txt": b"l"}),
    ]
    write_tar(tmp_path / "bad.tar", good[:1] + bad + good[1:])
    for name, where in (("middle", "middle"), ("boundary", "boundary")):
        write_tar(tmp_path / f"{name}.tar", [(f"{name}{i}", triplet(40 + i, f"w {i}", f"l {i}")) for i in range(3)])
        _truncate(tmp_path / f"{name}.tar", where)
    urls = "::".join(str(tmp_path / n) for n in ("bad.tar", "middle.tar", "boundary.tar", "absent.tar"))
    expected = {"missing_image": 1, "missing_yw": 1, "missing_yl": 1, "undecodable_text": 1, "empty_caption": 1,
                "identical_captions": 2, "corrupt_image": 2, "truncated_shard": 2, "unreadable_shard": 1}
    # delivered: 2 from bad.tar, 1 before the cut in middle.tar, 2 before the cut in boundary.tar
    return urls, expected, 5


@pytest.mark.parametrize("workers", [0, 2])
def test_each_bad_sample_kind_is_skipped_and_counted_exactly(tmp_path, tokenizer, workers):
    from open_clip_po.data import SKIP_KINDS, SkipLedger

    urls, expected, good = _bad_shards(tmp_path)
    info = _load(po_args(train_data=urls, train_num_samples=100, batch_size=1, workers=workers), tokenizer)
    ledger = SkipLedger()
    for epoch in (0, 1):  # the same counts again in the second epoch: nothing carried over or lost
        batches = read_epoch(info, epoch)
        assert len(batches) == good
        for b in batches:
            ledger.add(b["skipped"])
        assert ledger.totals == {k: (epoch + 1) * expected.get(k, 0) for k in SKIP_KINDS}


def test_strict_mode_raises_naming_shard_and_key(tmp_path, tokenizer):
    from open_clip_po.data import BadSampleError

    shard = write_tar(tmp_path / "s.tar", [("ok", triplet(0, "w", "l")),
                                           ("the_bad_one", {k: v for k, v in triplet(1, "w", "l").items()
                                                            if k != "yl.txt"})])
    for workers in (0, 1):  # also through a DataLoader worker process
        info = _load(po_args(train_data=str(shard), train_num_samples=2, batch_size=1, workers=workers,
                             po_strict_data=True), tokenizer)
        with pytest.raises(BadSampleError, match=r"missing_yl.*s\.tar.*the_bad_one"):
            read_epoch(info)
    write_tar(tmp_path / "t.tar", [(f"k{i}", triplet(i, "w", "l")) for i in range(3)])
    _truncate(tmp_path / "t.tar", "middle")
    info = _load(po_args(train_data=str(tmp_path / "t.tar"), train_num_samples=3, batch_size=1,
                         po_strict_data=True), tokenizer)
    with pytest.raises(BadSampleError, match=r"truncated_shard.*t\.tar.*key k1"):
        read_epoch(info)


def test_reg_bad_samples_are_counted_under_reg_kinds(tmp_path, tokenizer):
    pref = write_tar(tmp_path / "p.tar", [(f"p{i}", triplet(i, "w", "l")) for i in range(4)])
    reg = write_tar(tmp_path / "r.tar", [("r0", {"png": image_bytes(50), "txt": b"clean"}),
                                         ("r1", {"png": image_bytes(51)}),
                                         ("r2", {"png": image_bytes(52)[:50], "txt": b"x"})])
    info = _load(po_args(train_data=str(pref), train_num_samples=4, batch_size=1, po_reg_data=str(reg),
                         po_reg_batch_size=1), tokenizer)
    batches = read_epoch(info)
    total = Counter()
    for b in batches:
        total.update(b["skipped"])
        assert torch.equal(b["reg_texts"][0], tokenizer(["clean"])[0])
    # 4 reg batches = 4 passes over r.tar (one good sample each); each pass meets both bad ones, the last
    # pass may stop before reaching them.
    assert set(total) == {"reg_missing_caption", "reg_corrupt_image"}
    assert 3 <= total["reg_missing_caption"] <= 4 and 3 <= total["reg_corrupt_image"] <= 4


def test_resampled_sources_follow_upsampling_factors(shards, tokenizer, monkeypatch):
    from open_clip_po.data import reader

    # An endless stream would first fill open_clip's 1000-sample shuffle buffer; keep the test quick.
    monkeypatch.setattr(reader, "SAMPLE_SHUFFLE_INITIAL", 10)
    a = str(shards / "pref-{000000..000001}.tar")
    b = str(shards / "pref-{000002..000003}.tar")
    from_a = shard_contents([shards / "pref-000000.tar", shards / "pref-000001.tar"])
    args = po_args(train_data=f"{a}::{b}", dataset_resampled=True, train_data_upsampling_factors="1::0",
                   train_num_samples=10, batch_size=2)
    info = _load(args, tokenizer)
    batches = read_epoch(info)
    assert len(batches) == info.dataloader.num_batches == 5
    assert all(key in from_a for key, _, _ in _rows(batches))  # weight 0: source b never drawn
    with pytest.raises(ValueError, match="dataset-resampled"):
        _load(po_args(**{**vars(args), "dataset_resampled": False}), tokenizer)
    with pytest.raises(ValueError, match="every reader needs a shard"):
        _load(po_args(train_data=a, workers=2, world_size=2), tokenizer)


def _ledger_rank(rank, path, queue):
    import torch.distributed as dist

    from open_clip_po.data import SkipLedger

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    ledger = SkipLedger()
    ledger.add({"missing_yw": 1 + rank, "reg_corrupt_image": 10 * rank})
    queue.put((rank, ledger.all_reduce(), ledger.totals["missing_yw"]))
    dist.destroy_process_group()


def test_skip_ledger_sums_across_ranks_and_logs(tmp_path, caplog):
    from open_clip_po.data import SkipLedger

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ledger_rank, args=(r, tmp_path / "pg", queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, reduced, local in results:
        assert reduced["missing_yw"] == 3 and reduced["reg_corrupt_image"] == 10 and local == 1 + rank
        assert sum(reduced.values()) == 13

    ledger = SkipLedger()
    ledger.add({"missing_yw": 2})
    with caplog.at_level(logging.INFO):
        ledger.log(epoch=0)
        ledger.add({"corrupt_image": 1})
        ledger.log()
    lines = [r.getMessage() for r in caplog.records if "bad samples skipped" in r.getMessage()]
    assert "epoch 0" in lines[0] and "missing_yw=2" in lines[0]
    assert "end of training" in lines[1] and ": corrupt_image=1 (sum 1); run total: missing_yw=2, corrupt_image=1" \
        in lines[1]
    with pytest.raises(ValueError, match="unknown skip kind"):
        ledger.add({"gremlins": 1})
