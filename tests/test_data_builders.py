"""Shard builders: the typographic attack, clean pairs, gender triplets, and the shard writer itself."""
from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_helpers import CLASSES, make_image_folder, noise_image

NAMES = [c.replace("_", " ") for c in CLASSES]


def _samples(path):
    """key → {ext: bytes} of one shard, in file order."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _all_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def typographic(tmp_path_factory):
    from open_clip_po.data.typographic import build_typographic

    root = tmp_path_factory.mktemp("typographic")
    images = make_image_folder(root / "images")
    out = root / "out"
    sizes = build_typographic(images, out, per_image=2, image_size=32, image_format="png", max_count=6, seed=0,
                              quiet=True)
    return images, out, sizes


def test_typographic_shards_follow_the_format_and_attack_rules(typographic):
    _, out, sizes = typographic
    expected_sizes = {f"pref-{i:06d}.tar": 6 for i in range(4)} | {f"reg-{i:06d}.tar": 6 for i in range(2)}
    assert sizes == expected_sizes
    assert json.loads((out / "sizes.json").read_text()) == expected_sizes
    assert (out / "classnames.txt").read_text().splitlines() == NAMES

    clean = {}
    for i in range(2):
        for key, m in _samples(out / f"reg-{i:06d}.tar").items():
            assert set(m) == {"png", "txt", "json"}
            meta = json.loads(m["json"])
            assert m["txt"].decode() == f"a photo of a {NAMES[meta['label']]}."
            clean[meta["source"]] = np.array(Image.open(io.BytesIO(m["png"])))
    assert len(clean) == 12

    written_seen = set()
    for i in range(4):
        for key, m in _samples(out / f"pref-{i:06d}.tar").items():
            assert list(m) == ["png", "yw.txt", "yl.txt", "txt", "json"]
            meta = json.loads(m["json"])
            label, written, attack = meta["label"], meta["written"], meta["attack"]
            assert written != label
            written_seen.add((label, written))
            assert meta["source"].split("/")[0] == CLASSES[label]
            assert m["yw.txt"].decode() == f"a photo of a {NAMES[label]}." == m["txt"].decode()
            assert m["yl.txt"].decode() == f"a photo of a {NAMES[written]}."
            assert attack["text"].replace("\n", " ") == NAMES[written]
            assert attack["fill"] != attack["stroke"]
            left, top, right, bottom = attack["bbox"]
            assert 0 <= left < right <= 32 and 0 <= top < bottom <= 32
            # The text is drawn inside its bbox and nowhere else (lossless png: exact comparison).
            attacked = np.array(Image.open(io.BytesIO(m["png"])))
            changed = np.argwhere((attacked != clean[meta["source"]]).any(-1))
            assert len(changed) > 0
            assert changed[:, 0].min() >= top and changed[:, 0].max() < bottom
            assert changed[:, 1].min() >= left and changed[:, 1].max() < right
    assert len(written_seen) > 3  # different wrong classes get written


def test_typographic_same_seed_gives_byte_identical_shards(typographic, tmp_path):
    from open_clip_po.data.typographic import build_typographic

    images, out, _ = typographic
    # Two rendering processes instead of none: the output must not depend on how the work was split.
    build_typographic(images, tmp_path / "again", per_image=2, image_size=32, image_format="png", max_count=6,
                      seed=0, workers=2, quiet=True)
    assert _all_files(tmp_path / "again") == _all_files(out)
    build_typographic(images, tmp_path / "other", per_image=2, image_size=32, image_format="png", max_count=6,
                      seed=1, quiet=True)
    assert (tmp_path / "other" / "pref-000000.tar").read_bytes() != (out / "pref-000000.tar").read_bytes()


@pytest.mark.parametrize("size", [24, 64, 224])
def test_render_attack_keeps_text_inside_and_colours_distinct(size):
    from open_clip_po.data.typographic import COLORS, render_attack

    rng = random.Random(size)
    base = noise_image(size, size=(size, size + 7))
    before = np.array(base)
    for i in range(60):
        text = ["ox", "golden retriever", "a rather long class name here"][i % 3]
        attacked, p = render_attack(base, text, rng)
        assert np.array_equal(np.array(base), before)  # the input image is untouched
        assert p["fill"] in COLORS and p["stroke"] in COLORS and p["fill"] != p["stroke"]
        assert (p["text"].count("\n") == 1) == (len(text.split()) >= 2)
        left, top, right, bottom = p["bbox"]
        assert 0 <= left < right <= size and 0 <= top < bottom <= size + 7
        changed = np.argwhere((np.array(attacked) != before).any(-1))
        assert len(changed) > 0
        assert changed[:, 0].min() >= top and changed[:, 0].max() < bottom
        assert changed[:, 1].min() >= left and changed[:, 1].max() < right
        if size == 224 and text == "ox":  # short text always fits: the size is the drawn one in 20..40
            assert 20 <= p["size"] <= 40


def test_render_attack_falls_back_to_pillow_font():
    from open_clip_po.data.typographic import PIL_DEFAULT_FONT, render_attack

    attacked, p = render_attack(noise_image(0, (64, 64)), "dog", random.Random(0), fonts=[PIL_DEFAULT_FONT])
    assert p["font"] == PIL_DEFAULT_FONT and attacked.size == (64, 64)


def test_pick_written_class_is_never_the_true_one():
    from open_clip_po.data.typographic import pick_written_class

    rng = random.Random(0)
    for n in (2, 3, 10):
        for true in range(n):
            drawn = [pick_written_class(true, n, rng) for _ in range(200)]
            assert true not in drawn
            assert set(drawn) == set(range(n)) - {true}  # every wrong class can be drawn
    with pytest.raises(ValueError, match="at least 2"):
        pick_written_class(0, 1, rng)


def test_eval_folder_records_true_and_written_class(tmp_path):
    from open_clip_po.data.typographic import build_eval_folder

    images = make_image_folder(tmp_path / "images", per_class=2)
    records = build_eval_folder(images, tmp_path / "ev", NAMES, image_size=32, seed=3, quiet=True)
    assert len(records) == 6
    lines = [json.loads(x) for x in (tmp_path / "ev" / "attacks.jsonl").read_text().splitlines()]
    assert lines == records
    for r in records:
        folder, name = r["file"].split("/")
        assert folder == CLASSES[r["label"]] and r["written"] != r["label"]
        assert name.endswith(f"_true{r['label']}_written{r['written']}.png")
        assert Image.open(tmp_path / "ev" / r["file"]).size == (32, 32)


def test_shard_writer_rolls_over_and_publishes_whole_sets(tmp_path):
    from open_clip_po.data import ShardWriter

    blob = bytes(2000)  # one member: 512 header + 2048 data bytes
    with ShardWriter(tmp_path / "a", "x", max_count=4) as w:
        for i in range(10):
            w.write(f"{i:03d}", {"bin": blob})
    assert w.sizes == {"x-000000.tar": 4, "x-000001.tar": 4, "x-000002.tar": 2}
    with ShardWriter(tmp_path / "s", "x", max_size=7000) as w:
        for i in range(5):
            w.write(f"{i:03d}", {"bin": blob})
    assert list(w.sizes.values()) == [2, 2, 1]

    # A failure after one finished shard publishes nothing: no shard, no sizes.json, no manifest.
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "f", "x", max_count=2) as w:
            for i in range(3):
                w.write(f"{i:03d}", {"bin": blob})
            raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "f").iterdir() if not p.name.startswith(".")] == []
    assert not any(p.name.startswith(".f.staging") for p in tmp_path.iterdir())

    # A re-run with fewer shards replaces the whole set: stale shards and their sizes.json entries go.
    with ShardWriter(tmp_path / "a", "x", max_count=100) as w:
        w.write("000", {"bin": blob})
    assert sorted(p.name for p in (tmp_path / "a").glob("x-*.tar")) == ["x-000000.tar"]
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {"x-000000.tar": 1}
    manifest = json.loads((tmp_path / "a" / "build.json").read_text())
    assert manifest["files"]["x-000000.tar"] == (tmp_path / "a" / "x-000000.tar").stat().st_size
    with pytest.raises(ValueError, match="no dots"):
        ShardWriter(tmp_path / "k", "x").write("a.b", {"bin": blob})


def test_pairs_builder_cli(tmp_path, capsys):
    from open_clip_po.data import pairs

    images = make_image_folder(tmp_path / "images", per_class=3)
    (tmp_path / "names.txt").write_text("kitty\npuppy\ngolden\n")
    assert pairs.main(["--images", str(images), "--out", str(tmp_path / "out"), "--image-size", "16",
                       "--classnames", str(tmp_path / "names.txt"), "--template", "{} pic", "--quiet"]) == 0
    samples = _samples(tmp_path / "out" / "pairs-000000.tar")
    assert len(samples) == 9 and json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"pairs-000000.tar": 9}
    for m in samples.values():
        meta = json.loads(m["json"])
        assert m["txt"].decode() == ["kitty", "puppy", "golden"][meta["label"]] + " pic"
        assert meta["source"].startswith(CLASSES[meta["label"]] + "/")
        assert Image.open(io.BytesIO(m["jpg"])).size == (16, 16)
    (tmp_path / "bad.txt").write_text("only\ntwo\n")
    assert pairs.main(["--images", str(images), "--out", str(tmp_path / "o2"), "--classnames",
                       str(tmp_path / "bad.txt")]) == 2
    assert "2 class names but the image folder has 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        pairs.main(["--help"])
    assert exc.value.code == 0


def _gender_csv(tmp_path, rows):
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(len(rows)):
        noise_image(70 + i, (20, 24)).save(tmp_path / "img" / f"{i}.png")
    lines = ["image,gender,activity"] + [f"img/{i}.png,{g},{a}" for i, (g, a) in enumerate(rows)]
    (tmp_path / "people.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "people.csv"


def test_gender_builder_flips_the_preferred_caption(tmp_path, capsys):
    from open_clip_po.data import gender

    rows = [("man", "cooking"), ("woman", "fixing a car"), ("Man", " surfing "), ("woman", "reading")]
    csv_path = _gender_csv(tmp_path, rows)
    assert gender.main(["--csv", str(csv_path), "--out", str(tmp_path / "out"), "--image-size", "16",
                        "--image-format", "png", "--quiet"]) == 0
    pref, reg = _samples(tmp_path / "out" / "pref-000000.tar"), _samples(tmp_path / "out" / "reg-000000.tar")
    assert len(pref) == len(reg) == 4 and pref.keys() == reg.keys()
    by_source = {}
    for key, m in pref.items():
        meta = json.loads(m["json"])
        flipped = {"man": "woman", "woman": "man"}[meta["gender"]]
        assert m["yw.txt"].decode() == f"The {flipped} is {meta['activity']}" == m["txt"].decode()
        assert m["yl.txt"].decode() == f"The {meta['gender']} is {meta['activity']}"
        assert reg[key]["txt"].decode() == f"The person is {meta['activity']}"
        assert reg[key]["png"] == m["png"]
        by_source[meta["source"]] = (meta["gender"], meta["activity"])
    assert by_source == {f"img/{i}.png": (g.lower(), a.strip()) for i, (g, a) in enumerate(rows)}

    # Custom templates; same seed → same bytes.
    for name in ("c1", "c2"):
        gender.build_gender(csv_path, tmp_path / name, template="a {gender} {activity}",
                            reg_template="someone {activity}", seed=4, quiet=True)
    assert _all_files(tmp_path / "c1") == _all_files(tmp_path / "c2")
    m = next(iter(_samples(tmp_path / "c1" / "pref-000000.tar").values()))
    assert m["yl.txt"].decode().startswith(("a man ", "a woman "))

    (tmp_path / "bad").mkdir()
    bad = _gender_csv(tmp_path / "bad", [("man", "running"), ("person", "running")])
    assert gender.main(["--csv", str(bad), "--out", str(tmp_path / "o3")]) == 2
    assert "people.csv:3: gender must be 'man' or 'woman', got 'person'" in capsys.readouterr().err
    assert not (tmp_path / "o3" / "pref-000000.tar").exists()


@pytest.mark.parametrize("name,size", [("00000001_0.jpg", 12345), ("k.yw.txt", 0), ("x" * 96 + ".txt", 512),
                                       ("y" * 120 + ".json", 7)])
def test_hand_made_tar_headers_read_back_with_tarfile(name, size):
    from open_clip_po.data.shards import tar_header

    header = tar_header(name, size)
    if len(name) <= 100:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")  # also verifies the checksum
        assert (info.name, info.size, info.mode, info.mtime, info.uid, info.type) == (name, size, 0o644, 0, 0,
                                                                                     tarfile.REGTYPE)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    blob = header + data + bytes(-size % 512) + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:  # long names: GNU long-name header from tarfile
        (member,) = tar.getmembers()
        assert member.name == name and tar.extractfile(member).read() == data
