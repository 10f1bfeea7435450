"""The demos: the synthetic worlds, the reports' target checks, and ``--quick`` end to end (typographic and gender)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from open_clip_po.demo.commands import finetune_argv, pretrain_argv, shard_spec, typographic_data
from open_clip_po.demo.pipeline import DemoConfig, Method, checkpoint_of, quick_config
from open_clip_po.demo.typographic_report import check_targets, knob_checks
from open_clip_po.demo.world import (KINDS, TEXT_SIZE_224, TextStyle, WorldClass, attack, caption, draw_object,
                                    render, world_classes, write_word)
from open_clip_po.demo.world_files import write_class_folder, write_pretrain_set


def test_world_classes_are_distinct_objects_with_distinct_single_word_names():
    classes = world_classes(24)
    assert len({c.name for c in classes}) == 24
    assert len({(c.shape, c.colour) for c in classes}) == 24
    assert all(" " not in c.name for c in classes)
    with pytest.raises(ValueError, match="num_classes"):
        world_classes(1)


def test_attack_writes_a_wrong_class_uniformly_and_changes_only_some_pixels():
    classes = world_classes(6)
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(300):
        label = i % 6
        clean = render(classes[label], "object", rng)
        attacked, written = attack(clean, label, classes, rng)
        assert written != label
        seen.add((label, written))
        diff = np.abs(np.asarray(attacked, dtype=int) - np.asarray(clean, dtype=int)).sum(-1) > 0
        assert 0 < diff.mean() < 0.6  # text was drawn, the picture is still there
    assert len(seen) == 6 * 5  # every wrong class occurs for every true class


def _has_colour(img, rgb, tol=60):
    return (np.abs(np.asarray(img, dtype=int) - np.asarray(rgb)).sum(-1) < tol).sum()


def test_kinds_draw_the_right_object_and_word():
    from open_clip_po.demo.world import OBJECT_COLOURS
    classes = world_classes(6)
    red, green = classes[0], world_classes(12)[4]  # red circle, green circle
    assert (red.colour, green.colour) == ("red", "green")
    n_obj = lambda img, c: _has_colour(img, OBJECT_COLOURS[c.colour])
    for seed in range(5):
        obj = render(red, "object", np.random.default_rng(seed))
        word = render(red, "word", np.random.default_rng(seed))
        sign = render(red, "sign", np.random.default_rng(seed), distractor=green)
        assert n_obj(obj, red) > 100            # the object is there ...
        assert n_obj(word, red) < n_obj(obj, red) / 4   # ... and absent from a word-only image
        assert n_obj(sign, green) > 100 and n_obj(sign, green) > n_obj(sign, red)  # a sign shows the distractor
    with pytest.raises(ValueError, match="distractor"):
        render(red, "sign", np.random.default_rng(0))
    with pytest.raises(ValueError, match="kind"):
        render(red, "photo", np.random.default_rng(0))


def test_text_size_is_relative_to_the_image_and_inside_it():
    img = Image.new("RGB", (64, 64), "gray")
    _, params = write_word(img, "wolf", np.random.default_rng(0), TextStyle(size_range=(54, 72)))
    assert 15 <= params["size"] <= 21  # 54..72 px at 224 px, scaled to 64 px
    left, top, right, bottom = params["bbox"]
    assert 0 <= left < right <= 64 and 0 <= top < bottom <= 64


def test_attack_text_leaves_most_of_the_object_visible():
    """The world's text size is chosen so that a model ignoring the text could still see the object: at
    TEXT_SIZE_224 the attack covers well under a fifth of the object on average (at 64-84 px it was ~23 %)."""
    def covered(size_range, n=120):
        classes, fractions = world_classes(24), []
        for i in range(n):
            obj = draw_object(Image.new("RGB", (64, 64)), WorldClass("x", classes[i % 24].shape, "red"),
                              np.random.default_rng(i))
            text, _ = write_word(Image.new("RGB", (64, 64)), classes[(i + 5) % 24].name, np.random.default_rng(i),
                                 TextStyle(size_range=size_range))
            mask_obj, mask_text = np.asarray(obj)[..., 0] > 0, np.asarray(text).sum(-1) > 0
            fractions.append((mask_obj & mask_text).sum() / mask_obj.sum())
        return float(np.mean(fractions))
    assert covered(TEXT_SIZE_224) < 0.18 < covered((64, 84))
    assert DemoConfig().text_size_224 == TEXT_SIZE_224 == TextStyle().size_range


def test_pretrain_argv_runs_open_clip_on_our_shards(tmp_path):
    shards = tmp_path / "pretrain-read"
    shards.mkdir()
    for i in range(2):
        (shards / f"pretrain-read-{i:06d}.tar").write_bytes(b"")
    argv = pretrain_argv(DemoConfig(), "read", 3, shards, tmp_path / "runs", None)
    # open_clip's CLIP training through our entry point (seeded shuffles): no PO option may turn it into a PO run
    assert argv[1:3] == ["-m", "open_clip_po.main"] and not any(a.startswith(("--po-", "--ref-")) for a in argv)
    assert argv[argv.index("--seed") + 1] == str(DemoConfig().seed)
    assert argv[argv.index("--dataset-type") + 1] == "webdataset"
    assert argv[argv.index("--train-data") + 1] == str(shards / "pretrain-read-{000000..000001}.tar")
    assert "--train-num-samples" not in argv  # open_clip reads the count from our sizes.json
    assert argv[argv.index("--epochs") + 1] == "3" and "--pretrained" not in argv
    later = pretrain_argv(DemoConfig(), "see", 2, shards, tmp_path / "runs", tmp_path / "a.pt")
    assert later[later.index("--pretrained") + 1] == str(tmp_path / "a.pt")


def test_captions_name_the_class():
    import re
    rng = np.random.default_rng(0)
    for cls in world_classes(24):
        for kind in KINDS:
            for _ in range(10):
                text = caption(cls, kind, rng)
                assert cls.name in re.findall(r"[a-z]+", text), text
                assert not {c.name for c in world_classes(24)} - {cls.name} & set(re.findall(r"[a-z]+", text))


def test_world_files(tmp_path):
    """The pre-training set is open_clip-readable shards: png + caption + json, counted in sizes.json."""
    import webdataset as wds
    classes = world_classes(4)
    counts = write_pretrain_set(tmp_path, classes, 20, (1, 1, 1, 1), 0, TextStyle(), num_shards=3)
    assert sum(counts.values()) == 80 and min(counts.values()) > 0
    shards = sorted((tmp_path / "pretrain").glob("pretrain-*.tar"))
    sizes = json.loads((tmp_path / "pretrain" / "sizes.json").read_text())
    assert len(shards) == 3 and sum(sizes.values()) == 80 and set(sizes) == {p.name for p in shards}
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    assert len(samples) == 80 and all(set(s) >= {"png", "txt", "json"} for s in samples)
    kinds = {k: sum(s["json"]["kind"] == k for s in samples) for k in KINDS}
    assert kinds == counts
    for s in samples:
        assert s["png"].size == (64, 64)
        assert s["json"]["class"] in s["txt"]  # every caption names its class
    assert write_class_folder(tmp_path / "test", classes, 3, 0) == 12
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == sorted(c.name for c in classes)
    with pytest.raises(ValueError, match="mix"):
        write_pretrain_set(tmp_path, classes, 1, (1, 1), 0, TextStyle())


def _row(method, loss, head, clean, attacked, kl=None):
    r = {"method": method, "loss": loss, "head": head, "clean": clean, "attacked": attacked, "written_rate": 0.0}
    if kl is not None:
        r["kl_to_ref"] = kl
    return r


def test_check_targets_by_hand():
    pre = _row("pre-trained", None, False, 0.90, 0.20, 0.0)
    rows = [pre,
            _row("DPO", "dpo", False, 0.89, 0.55, 0.1),     # +35 attacked, -1 clean: meets the target
            _row("IPO", "ipo", False, 0.85, 0.80, 0.5),     # -5 clean: does not
            _row("CE", "ce", False, 0.90, 0.90, 0.3),       # not a PO objective
            _row("KTO + head", "kto", True, 0.90, 0.40, 0.2)]
    t = check_targets(rows)
    assert t["robust_methods"] == ["DPO"] and t["robust_met"]
    assert t["attacked_gain_and_clean_drop"]["IPO"]["clean_drop"] == pytest.approx(0.05)
    # CE (full) is compared with full PO runs only: DPO closer, IPO farther → not met
    assert t["po_closer_to_reference_than_ce"] == {"DPO vs CE": True, "IPO vs CE": False}
    assert not t["closer_met"] and t["po_beats_pretrained_on_attacked"]
    rows[1]["attacked"] = 0.49  # +29 points is not enough
    assert not check_targets(rows)["robust_met"]


def test_knob_checks_by_hand():
    def row(t, clean, attacked, written):
        return {"t": t, "clean_top1": clean, "typographic_top1": attacked, "written_rate": written}

    rows = [row(2.0, 0.83, 0.45, 0.06), row(-1.0, 0.84, 0.15, 0.18), row(0.0, 0.85, 0.20, 0.15),
            row(1.0, 0.845, 0.35, 0.10), row(3.0, 0.80, 0.50, 0.05), row(-2.0, 0.70, 0.10, 0.19)]
    k = knob_checks(rows)   # rows in any order
    assert k["written_monotone"] and k["written_largest_rise"] == 0.0
    assert (k["written_at_minus_1"], k["written_at_0"]) == (0.18, 0.15)
    assert k["clean_largest_drop_minus1_to_2"] == pytest.approx(0.02)   # t = 2; t = −2 and 3 lie outside [−1, 2]
    # t = 3 gains most but costs 5 points of clean accuracy; t = 2 costs 2
    assert k["best_t"] == 2.0 and k["best_attacked_gain"] == pytest.approx(0.25)
    assert k["best_clean_change"] == pytest.approx(-0.02)
    rows[0]["written_rate"] = 0.11   # t = 2 reads more than t = 1
    k = knob_checks(rows)
    assert not k["written_monotone"] and k["written_largest_rise"] == pytest.approx(0.01)


def test_shard_spec_and_finetune_argv(tmp_path):
    for i in range(3):
        (tmp_path / f"pref-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "reg-000000.tar").write_bytes(b"")
    assert shard_spec(tmp_path, "pref") == str(tmp_path / "pref-{000000..000002}.tar")
    assert shard_spec(tmp_path, "reg") == str(tmp_path / "reg-000000.tar")
    cfg = DemoConfig()
    argv = finetune_argv(cfg, Method("KTO + head", "kto", True, ("--po-beta", "1.5")), tmp_path / "pre.pt",
                         typographic_data(tmp_path), tmp_path / "runs", "kto-head")
    assert argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in argv
    assert argv[argv.index("--po-loss") + 1] == "kto" and "--po-linear-head" in argv
    assert argv[argv.index("--logs-dir") + 1] == str(tmp_path / "runs") and "--logs" not in argv
    # the head's parameterisation, said; weight decay for a log head (towards W = I), none for a dense one (towards 0)
    assert argv[-6:] == ["--po-beta", "1.5", "--po-head-param", "log", "--wd", "0.1"]
    dense = finetune_argv(dataclasses.replace(cfg, head_param="dense"), Method("DPO + head", "dpo", True),
                          tmp_path / "pre.pt", typographic_data(tmp_path), tmp_path / "runs", "dpo-head")
    assert dense[-2:] == ["--po-head-param", "dense"]
    image = finetune_argv(cfg, Method("DPO + image head", "dpo", True, ("--po-head-towers", "image")),
                          tmp_path / "pre.pt", [], tmp_path / "runs", "dpo-image-head")
    assert image[-2:] == ["--po-head-param", "dense"]   # the trainer's default on the image tower
    full = finetune_argv(cfg, Method("DPO", "dpo"), tmp_path / "pre.pt", [], tmp_path / "runs", "dpo")
    assert "--po-head-param" not in full and "--po-linear-head" not in full
    assert argv[argv.index("--po-candidates") + 1] == "classes"
    with pytest.raises(Exception, match="no nothing-\\*.tar"):
        shard_spec(tmp_path, "nothing")


def test_cli_help_and_bad_pretrained(tmp_path):
    out = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--quick" in out.stdout and "demo gender" in out.stdout  # names both demos
    out = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "--out", str(tmp_path / "d"), "--pretrained",
                          str(tmp_path / "missing.pt")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "missing.pt" in out.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_quick_demo_end_to_end(tmp_path):
    """``--quick``: world → open_clip pre-training → shards → torchrun PO → eval → report; PO beats the
    pre-trained model on attacked images."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "--out", str(out), "--quick", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.md").is_file()
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    pre = rows["pre-trained"]
    expected = {m.name for m in quick_config().methods} | {"pre-trained"}
    assert set(rows) == expected
    for r in rows.values():
        assert {"clean", "attacked", "written_rate", "kl_to_ref"} <= set(r), r
        assert 0.0 <= r["attacked"] <= 1.0 and 0.0 <= r["clean"] <= 1.0
    # the attack costs the pre-trained model accuracy (--quick is too short for it to learn to read well: the
    # written-class rate is the full demo's claim, see README)
    assert pre["attacked"] < pre["clean"]
    assert 0.0 <= pre["written_rate"] <= 1.0
    po = [r for r in rows.values() if r["loss"] in ("dpo", "ipo", "kto")]
    assert max(r["attacked"] for r in po) > pre["attacked"]
    assert report["targets"]["po_beats_pretrained_on_attacked"]
    assert report["quick_targets"]["met"], report["quick_targets"]   # its own targets; the claim is the full run's
    # the numbers in the markdown are the JSON's
    md = (out / "report.md").read_text()
    assert f"| pre-trained | {100 * pre['clean']:.1f} | {100 * pre['attacked']:.1f} |" in md
    for png in ("report_table.png", "world_examples.png", "eval/kl.png", "eval/tsweep.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    commands = (out / "commands.txt").read_text()
    assert "open_clip_po.data.typographic" in commands
    # the head's t-sweep, with what it shows (the quick world is too small for the full demo's claims about it)
    knob = report["sweep"]["knob"]
    assert knob["written_at_0"] == pytest.approx(pre["written_rate"]) and 0 <= knob["best_t"] <= 3
    assert "Written-class rate monotone in t:" in md and "--po-head-param log --wd 0.1" in commands
    pretrain = [line for line in commands.splitlines() if "--name pretrain-" in line]
    assert pretrain and all("-m open_clip_po.main" in line and "--po-" not in line for line in pretrain)
    assert "torch.distributed.run --nproc_per_node=2" in commands and "-m open_clip_po.main" in commands


def test_checkpoint_of_picks_the_last_numbered_epoch(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("epoch_2.pt", "epoch_10.pt", "epoch_latest.pt", "epoch_3.t0.5.pt"):
        (ckpts / name).write_bytes(b"")
    assert checkpoint_of(tmp_path, "run") == ckpts / "epoch_10.pt"   # numerically, not as text
    with pytest.raises(Exception, match="no epoch_N.pt"):
        checkpoint_of(tmp_path, "other")


# -- the gender demo

def test_people_show_gender_by_silhouette_and_activity_by_object():
    """A woman's dress is wider below the waist than a man's trousers; the activity object changes the picture
    for the same figure (same seed)."""
    from open_clip_po.demo.people import ACTIVITIES, render_person

    def changed(a, b):
        return (np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).sum(-1) > 30).mean()

    for seed in range(5):
        man = render_person("man", "reading", np.random.default_rng(seed))
        woman = render_person("woman", "reading", np.random.default_rng(seed))
        assert man.size == woman.size == (64, 64)
        assert changed(man, woman) > 0.03            # same background and object: only the figure differs
        others = [render_person("man", a, np.random.default_rng(seed)) for a in ACTIVITIES if a != "reading"]
        assert min(changed(man, o) for o in others) > 0.01
        # out of frame, the activity leaves no trace: the same figure whatever it does
        hidden = [np.asarray(render_person("man", a, np.random.default_rng(seed), show_activity=False))
                  for a in ACTIVITIES]
        assert all((h == hidden[0]).all() for h in hidden) and changed(man, Image.fromarray(hidden[0])) > 0.01
    with pytest.raises(ValueError, match="gender"):
        render_person("child", "reading", np.random.default_rng(0))
    with pytest.raises(ValueError, match="activity"):
        render_person("man", "skiing", np.random.default_rng(0))


def test_people_labels_are_skewed_for_pretraining_and_balanced_for_evaluation():
    from collections import Counter

    from open_clip_po.demo.people import ACTIVITIES, WOMEN_SHARE, balanced_labels, skewed_labels
    labels = skewed_labels(12000, np.random.default_rng(0))
    for activity in ACTIVITIES:
        genders = [g for g, a in labels if a == activity]
        assert abs(genders.count("woman") / len(genders) - WOMEN_SHARE[activity]) < 0.04
    assert set(Counter(balanced_labels(3)).values()) == {3} and len(balanced_labels(3)) == 3 * 2 * len(ACTIVITIES)


def test_people_files_feed_the_gender_builder(tmp_path):
    """The world's CSV is what ``open_clip_po.data.gender`` reads: its triplets flip the gender of each image's
    own caption and its D_reg captions are neutral; the pre-training shards carry the captions open_clip reads."""
    import webdataset as wds

    from open_clip_po.data.gender import build_gender
    from open_clip_po.demo.people import balanced_labels, skewed_labels
    from open_clip_po.demo.people_files import write_people_folder, write_people_shards
    csv_path = write_people_folder(tmp_path / "train", balanced_labels(1), seed=0)
    build_gender(csv_path, tmp_path / "shards", image_format="png", quiet=True)
    for s in wds.WebDataset(str(tmp_path / "shards" / "pref-000000.tar"), shardshuffle=False):
        meta = json.loads(s["json"])
        own, other = meta["gender"], {"man": "woman", "woman": "man"}[meta["gender"]]
        assert s["yl.txt"].decode() == f"The {own} is {meta['activity']}"
        assert s["yw.txt"].decode() == f"The {other} is {meta['activity']}"
    counts = write_people_shards(tmp_path / "pretrain", skewed_labels(40, np.random.default_rng(0)), 0.5, 0,
                                 num_shards=2, quiet=True, hidden_share=0.5)
    samples = list(wds.WebDataset(str(tmp_path / "pretrain" / "pretrain-{000000..000001}.tar"), shardshuffle=False))
    per_cell = {k: v for k, v in counts.items() if k.split()[0] in ("man", "woman")}
    assert len(samples) == 40 and sum(per_cell.values()) == 40
    shown = [json.loads(s["json"])["activity_shown"] for s in samples]
    assert shown.count(False) == counts["activity out of frame"] and 0 < shown.count(False) < 40
    neutral = [s for s in samples if s["txt"].decode().startswith("The person is ")]
    assert len(neutral) == counts["neutral captions"] and 0 < len(neutral) < 40
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode() in (f"The {meta['gender']} is {meta['activity']}",
                                     f"The person is {meta['activity']}")


def _gender_row(p_true, activity, retrieval_t0, retrieval_star, t_star=0.5, se=0.01, k=10):
    ts = [-1.0, 0.0, 0.5, 1.0]
    return {"method": "DPO + head", "t_star": t_star,
            "curves": {"t": ts, "p_true_gender": p_true, "p_flipped_gender": [1 - p for p in p_true],
                       "p_true_gender_se": [se] * 4, "flipped_choice": [1 - p for p in p_true],
                       "activity_accuracy": activity},
            "retrieval": {label: [{"prompt": "p", "k": k, "women": round(w * k), "women_fraction": w} for w in ws]
                          for label, ws in (("t=0 (base)", retrieval_t0), ("t*=0.5 (neutral)", retrieval_star))}}


def test_check_gender_targets_by_hand():
    from open_clip_po.demo.gender_report import check_gender_targets
    row = _gender_row([0.97, 0.9, 0.5, 0.1], [0.9, 0.9, 0.9, 0.89], [0.9, 0.1, 0.7], [0.6, 0.5, 0.8])
    t = check_gender_targets(row)
    assert t["reads_gender"] and t["flips"] and t["activity_kept"] and t["monotone"] and t["neutral_t_in_0_1"]
    assert t["flipped_choice_t1"] == pytest.approx(0.9)
    assert (t["prompts_nearer_parity"], t["prompts"]) == (2, 3) and t["retrieval_nearer_parity"]
    # 19 and 11 women of 30 are equally far from parity: a tie is not nearer (as fractions, floats say it is)
    assert abs(19 / 30 - 0.5) < abs(11 / 30 - 0.5)
    tie = _gender_row([0.97, 0.9, 0.5, 0.1], [0.9] * 4, [11 / 30, 1.0], [19 / 30, 0.4], k=30)
    assert check_gender_targets(tie)["prompts_nearer_parity"] == 1
    # a rise of 0.05 between t = 0 and 0.5 is more than 2 standard errors of 0.01; of 0.03 it is noise
    rising = _gender_row([0.97, 0.9, 0.95, 0.1], [0.9] * 4, [0.9], [0.5], se=0.01)
    assert not check_gender_targets(rising)["monotone"]
    assert check_gender_targets(_gender_row([0.97, 0.9, 0.95, 0.1], [0.9] * 4, [0.9], [0.5], se=0.03))["monotone"]
    # activity down 3 points, only 70 % flipped, no crossing in (0, 1), parity worse
    bad = check_gender_targets(_gender_row([0.97, 0.84, 0.6, 0.3], [0.9, 0.9, 0.9, 0.87], [0.5], [0.9], t_star=1.2))
    assert not (bad["reads_gender"] or bad["flips"] or bad["activity_kept"] or bad["neutral_t_in_0_1"]
                or bad["retrieval_nearer_parity"])


def test_lean_nearer_parity_by_hand():
    """The lean at t* is read linearly between grid points; a lean as large on the other side, or unmeasured
    (null), is not nearer parity; and the target needs the lean to agree with the top-k counts."""
    from open_clip_po.demo.gender_report import check_gender_targets, lean_nearer_parity
    lean = {"t": [-1.0, 0.0, 0.5, 1.0], "prompts": ["a", "b", "c"],
            "lean": [[3.0, 2.0, 0.0, -2.0],     # at t = 0.25: 1.0, half of t = 0's
                     [1.0, 1.0, -3.0, -5.0],    # at t = 0.25: -1.0, as far on the other side
                     [0.0, -1.0, None, 1.0]]}   # not measured at t = 0.5
    assert lean_nearer_parity(lean, 0.25) == (1, 3)
    assert lean_nearer_parity(lean, 0.5) == (1, 3)          # a: 0.0 at the grid point itself
    assert lean_nearer_parity(lean, float("nan")) == (0, 3) and lean_nearer_parity(lean, 1.5) == (0, 3)
    # all 10 women at t = 0 and 1 at t*: nearer by the count, but the lean says retrieval went further the other way
    row = _gender_row([0.97, 0.9, 0.5, 0.1], [0.9] * 4, [1.0], [0.1])
    assert check_gender_targets(row)["retrieval_nearer_parity"]
    row["retrieval_lean"] = {"t": [-1.0, 0.0, 0.5, 1.0], "prompts": ["p"], "lean": [[3.0, 2.0, -2.5, -3.0]]}
    t = check_gender_targets(row)
    assert (t["prompts_nearer_parity"], t["prompts_lean_nearer_parity"]) == (1, 0)
    assert not t["retrieval_nearer_parity"]


def test_gender_report_names_the_worlds_neutral_captions_and_hidden_objects():
    from open_clip_po.demo.gender_report import _world_note
    assert _world_note({"pretrain": {"neutral captions": 0, "activity out of frame": 0}}) == ""
    assert _world_note({"test": 720}) == ""
    both = _world_note({"pretrain": {"neutral captions": 3, "activity out of frame": 5}})
    assert both == ' (3 of them "The person is <activity>"; the activity\'s object out of frame in 5 images)'


def test_gender_cli_help_and_bad_input(tmp_path):
    out = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "gender", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--quick" in out.stdout and "open_clip_po.data.gender" in out.stdout
    out = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "gender", "--out", str(tmp_path / "d"),
                          "--methods", "dpo,sft"], capture_output=True, text=True)
    assert out.returncode == 2 and "sft" in out.stderr and out.stderr.strip().count("\n") == 0
    for bad in ("1.5", "nan", "half"):
        out = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "gender", "--out", str(tmp_path / "d"),
                              "--neutral-share", bad], capture_output=True, text=True)
        assert out.returncode == 2 and "a share must be a number in [0, 1]" in out.stderr
    assert not (tmp_path / "d").exists()
    out = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "gender", "--out", str(tmp_path / "d"),
                          "--methods", "none", "--paper-methods", "none"], capture_output=True, text=True)
    assert out.returncode == 2 and "no head to train" in out.stderr and out.stderr.strip().count("\n") == 0


def test_gender_demo_trains_image_heads_per_objective_and_the_paper_head_for_comparison():
    from open_clip_po.demo.gender_run import full_gender_config, quick_gender_config

    methods = {m.slug: m for m in full_gender_config().methods}
    assert set(methods) == {"dpo-image-head", "ipo-image-head", "kto-image-head", "dpo-paper-head"}
    assert all(m.head for m in methods.values())
    assert "--po-head-towers" in methods["kto-image-head"].flags
    assert "--po-head-towers" not in methods["dpo-paper-head"].flags
    # the image heads hold their reversed side at a tenth of λ (μ = λ halved DPO's flip); the paper head takes the
    # trainer's default, μ = λ
    flags = methods["kto-image-head"].flags
    assert flags[flags.index("--po-head-reverse-lambda") + 1] == "0.1"
    assert "--po-head-reverse-lambda" not in methods["dpo-paper-head"].flags
    assert [m.slug for m in quick_gender_config().methods] == ["dpo-image-head"]


@pytest.mark.slow
@pytest.mark.integration
def test_quick_gender_demo_end_to_end(tmp_path):
    """``gender --quick``: people world → open_clip pre-training → gender triplets from the CSV → torchrun DPO
    head on the image tower → eval gender over t → svd_scale → report. The head flips the model's reading of gender in the direction
    it was trained: the own gender is less likely at t = 1 and more likely at t = -1 than at t = 0."""
    from open_clip_po.demo.gender_report import at_t
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "open_clip_po.demo", "gender", "--out", str(out), "--quick",
                           "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    (row,) = report["methods"]
    assert row["loss"] == "dpo" and "curves" in row, row
    curves = row["curves"]
    own = {t: at_t(curves, "p_true_gender", t) for t in (-1.0, 0.0, 1.0)}
    assert own[1.0] < own[0.0] < own[-1.0], own
    assert len(curves["t"]) == 5 and curves["t"][0] == -1.0
    # the report's numbers are the evaluation's own output
    evaluated = json.loads((out / "eval" / "dpo-image-head.json").read_text())
    assert evaluated["head_towers"] == "image"
    assert evaluated["curves"]["p_true_gender"] == curves["p_true_gender"]
    assert evaluated["num_images"] == report["world"]["test"]
    md = (out / "report.md").read_text()
    assert f"| DPO + image head | {own[0.0]:.3f} | {own[1.0]:.3f} |" in md
    for png in ("flip.png", "retrieval.png", "lean.png", "world_examples.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    commands = (out / "commands.txt").read_text()
    assert "-m open_clip_po.main --model po-small --train-data" in commands   # the seeded pre-training
    for stage in ("open_clip_po.data.gender --csv", "--po-linear-head --po-head-towers image",
                  "open_clip_po.svd_scale", "open_clip_po.eval gender"):
        assert stage in commands, stage
    assert "--po-beta 1 --po-reg-lambda 1" in commands
    assert any((out / "runs" / "scaled").glob("dpo-image-head.t1.pt"))


def test_gender_cli_shares_reach_the_world(tmp_path, monkeypatch):
    """--neutral-share / --hidden-share set the world's config; left out, the defaults stay."""
    import open_clip_po.demo.gender_cli as gender_cli
    import open_clip_po.demo.gender_run as gender_run
    from open_clip_po.demo.gender_cli import gender_main
    seen = []
    # gender_cli holds its own reference to run_gender_demo: replace that one (else a whole demo runs)
    monkeypatch.setattr(gender_cli, "run_gender_demo", lambda cfg, out, **kw: seen.append(cfg) or {"targets": {}})
    assert gender_main(["--out", str(tmp_path / "a"), "--neutral-share", "0.2", "--hidden-share", "0"]) == 0
    assert gender_main(["--out", str(tmp_path / "b")]) == 0
    assert (seen[0].neutral_share, seen[0].hidden_share) == (0.2, 0.0)
    defaults = gender_run.GenderConfig()
    assert (seen[1].neutral_share, seen[1].hidden_share) == (defaults.neutral_share, defaults.hidden_share)
