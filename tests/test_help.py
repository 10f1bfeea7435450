"""Every command's ``--help``: its own name and flags, each flag with text, and file names that are the ones the
builders write."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from open_clip_po.data import gender as gender_builder
from open_clip_po.data import pairs as pairs_builder
from open_clip_po.data import typographic as typographic_builder
from open_clip_po.demo import main as demo_main
from open_clip_po.eval.__main__ import main as eval_main
from open_clip_po.flags import po_argument_parser
from open_clip_po.ref_cache.build import PO_FLAGS_READ
from open_clip_po.ref_cache.build import main as ref_cache_main
from open_clip_po.surgery.cli import main as svd_scale_main
from open_clip_po.sweep.__main__ import main as sweep_main
from open_clip_po.sweep.driver import main as sweep_driver_main
from open_clip_po.trainer.seam import main as train_main

# (the command as a user types it, its main, the argv)
COMMANDS = [
    ("python -m open_clip_po.main", train_main, []),
    ("python -m open_clip_po.ref_cache", ref_cache_main, []),
    ("open-clip-po-svd-scale", svd_scale_main, []),   # = python -m open_clip_po.svd_scale
    ("python -m open_clip_po.eval", eval_main, []),
    *[("python -m open_clip_po.eval " + sub, eval_main, [sub]) for sub in ("zeroshot", "tsweep", "gender", "kl",
                                                                           "pareto")],
    ("python -m open_clip_po.sweep", sweep_main, []),
    *[("python -m open_clip_po.sweep.driver " + step, sweep_driver_main, [step])
      for step in ("plan", "element", "run", "finish")],
    ("python -m open_clip_po.demo", demo_main, []),
    ("python -m open_clip_po.demo gender", demo_main, ["gender"]),
    ("python -m open_clip_po.data.typographic", typographic_builder.main, []),
    ("python -m open_clip_po.data.pairs", pairs_builder.main, []),
    ("python -m open_clip_po.data.gender", gender_builder.main, []),
]


def _help_of(main, argv, monkeypatch, capsys) -> tuple[str, list[argparse.ArgumentParser]]:
    """The text ``main(argv + ["--help"])`` prints and the parsers whose help it printed."""
    shown = []
    original = argparse.ArgumentParser.format_help

    def format_help(self):
        shown.append(self)
        return original(self)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", format_help)
    try:
        status = main([*argv, "--help"])
    except SystemExit as e:
        status = e.code
    assert status in (0, None)
    return capsys.readouterr().out, shown


@pytest.mark.parametrize("command,main,argv", COMMANDS, ids=[c[0].replace("python -m ", "") for c in COMMANDS])
def test_help_names_the_command_and_every_flag_with_text(command, main, argv, monkeypatch, capsys):
    text, parsers = _help_of(main, argv, monkeypatch, capsys)
    assert text.startswith(f"usage: {command}"), text[:200]
    assert parsers
    for parser in parsers:
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{command}: {action.option_strings[0]} has no help text"
            assert action.option_strings[0] in text


def test_main_help_says_what_leaving_out_po_loss_does_and_where_open_clips_flags_are():
    out = subprocess.run([sys.executable, "-m", "open_clip_po.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m open_clip_po.main ")
    text = " ".join(out.stdout.split())
    assert "Without --po-loss (and no other --po-* flag) it runs open_clip's plain CLIP training" in text
    assert "python -m open_clip_train.main --help lists them" in text
    for action in po_argument_parser()._actions:  # every PO flag, with its text
        assert action.option_strings[0] in out.stdout and action.help


def test_ref_cache_help_shows_its_own_flags_first():
    out = subprocess.run([sys.executable, "-m", "open_clip_po.ref_cache", "--out", "x", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("usage: python -m open_clip_po.ref_cache --out DIR")
    assert text.count("usage:") == 1 and "__main__" not in text
    assert text.index("\n  --out DIR  cache folder") < min(text.index("\n  " + flag) for flag in PO_FLAGS_READ)
    assert "--po-loss" not in text   # flags it does not read are not listed as its own
    assert "python -m open_clip_train.main --help" in text


def _pattern_to_regex(pattern: str) -> re.Pattern:
    """``<stem>_true<T>_written<W>.png`` → a regex: ``<stem>`` any text, ``<T>``/``<W>`` an index; ``*`` any."""
    out = ""
    for piece in re.split(r"(<[^>]+>|\*)", pattern):
        if piece in ("<T>", "<W>", "<index>"):
            out += r"\d+"
        elif piece.startswith("<") or piece == "*":
            out += ".+"
        else:
            out += re.escape(piece)
    return re.compile(out + "$")


@pytest.mark.slow
def test_file_names_in_help_are_the_ones_the_builder_writes(tmp_path, monkeypatch, capsys):
    from data_helpers import make_image_folder

    images = make_image_folder(tmp_path / "images", per_class=2)
    out, attacked = tmp_path / "shards", tmp_path / "attacked"
    assert typographic_builder.main(["--images", str(images), "--out", str(out), "--eval-out", str(attacked),
                                     "--image-size", "32", "--quiet", "--max-count", "3"]) == 0
    written = sorted(p.relative_to(attacked) for p in attacked.rglob("*.png"))
    assert written

    # the evaluation's --typographic names the attacked copy's files
    eval_help, _ = _help_of(eval_main, ["zeroshot"], monkeypatch, capsys)
    named = re.search(r"each file named (\S+)", " ".join(eval_help.split())).group(1)
    for path in written:
        assert _pattern_to_regex(named).match(path.name), (named, path)
        assert path.parent.name in {p.name for p in images.iterdir()}  # the same class folders

    # the builder's own help: the attacked files, attacks.jsonl and everything in --out
    builder_help = " ".join(_help_of(typographic_builder.main, [], monkeypatch, capsys)[0].split())
    named = re.search(r"files named ``([^`]+)``", builder_help).group(1)
    assert all(_pattern_to_regex(named).match(p.name) for p in written)
    assert (attacked / "attacks.jsonl").is_file() and "``DIR/attacks.jsonl``" in builder_help
    promised = re.search(r"output folder for ([^ ]+(?: [^ ]+)*?)(?: --|$)", builder_help).group(1)
    for name in [n.strip(" ,") for n in promised.split(",")] + ["classnames.txt"]:
        assert any(_pattern_to_regex(name).match(p.name) for p in out.iterdir()), (name, sorted(out.iterdir()))
    assert "``OUT/classnames.txt``" in builder_help


def test_pattern_to_regex_is_strict():
    rx = _pattern_to_regex("<stem>_true<T>_written<W>.png")
    assert rx.match("00000_true0_written22.png")
    assert not rx.match("00000_written-22.png") and not rx.match("00000_true0_written22.jpg")
    assert _pattern_to_regex("pref-*.tar").match("pref-000001.tar")
    assert not _pattern_to_regex("pref-*.tar").match("reg-000001.tar")


def test_demo_pretrained_help_names_the_last_pretraining_run():
    from open_clip_po.demo import build_parser
    from open_clip_po.demo.pipeline import full_config

    help_text = "".join(build_parser().format_help().split())   # argparse wraps lines after hyphens
    last = full_config().stages[-1].name
    assert f"DIR/runs/pretrain-{last}/checkpoints/epoch_N.pt" in help_text


def test_docs_cite_only_files_the_repository_has():
    """Links and bare mentions of a ``.md`` (not file names in `code`, which name outputs) must exist."""
    repo = Path(__file__).resolve().parents[1]
    for doc in [*(repo / "docs").rglob("*.md"), repo / "patches" / "README.md"]:
        prose = re.sub(r"`[^`]*`", "", doc.read_text())
        for cited in re.findall(r"(?<![\w/.:-])([\w./-]+\.md)\b", prose):
            assert (doc.parent / cited).exists() or (repo / cited).exists(), f"{doc.name} cites {cited}"


def test_patches_readme_names_every_loss_the_project_declares_for_open_clip():
    repo = Path(__file__).resolve().parents[1]
    declared = re.findall(r'^(\w+) = "open_clip_po\.losses\.open_clip_adapter:', (repo / "pyproject.toml").read_text(),
                          re.M)
    text = " ".join((repo / "patches" / "README.md").read_text().split())
    listed = re.search(r"every one of its (\d+) built-in objectives in that group \([^)]*\): ([^.]+)\.", text)
    assert int(listed.group(1)) == len(declared)
    assert re.findall(r"`(\w+)`", listed.group(2)) == declared


def test_stock_open_clip_sees_the_tiny_configs_after_import_open_clip_po_only():
    """What docs/training.md says of open_clip's own tools: its registry has po-small once open_clip_po is imported
    (or its folder added), not before."""
    code = ("import open_clip\n"
            "try:\n    open_clip.create_model('po-small')\nexcept RuntimeError as e:\n    print('before:', e)\n"
            "import open_clip_po\n"
            "print('after:', type(open_clip.create_model_and_transforms('po-small')[0]).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "before: Model config for 'po-small' not found" in out.stdout
    assert "after: CLIP" in out.stdout
