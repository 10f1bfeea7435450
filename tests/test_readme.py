"""README is a front door: short, titled, and every command in it runs as written — each program exists and
accepts every flag the README gives it (checked against the program's own --help, in this process)."""
import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_LINES = 160


def commands() -> list[str]:
    """Every command of README's bash blocks: continuation lines joined, comments dropped, `&&` chains split."""
    text = README.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def help_text(argv: list[str]) -> str:
    """What ``python -m MODULE ARGS --help`` prints, run in this process."""
    module, rest = argv[0], argv[1:]
    buffer = io.StringIO()
    saved = sys.argv
    sys.argv = [module, *rest, "--help"]
    try:
        with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    assert exit_info.value.code in (0, None), f"python -m {' '.join(argv)} --help exited {exit_info.value.code}"
    return buffer.getvalue()


def open_clip_help() -> str:
    from open_clip_train.params import parse_args

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        parse_args(["--help"])
    return buffer.getvalue()


def python_module_call(words: list[str]) -> tuple[list[str], list[str]] | None:
    """(module and its subcommand, the arguments) of a `python -m` or `torchrun ... -m` command."""
    if "-m" not in words or words[0] not in ("python", "torchrun"):
        return None
    i = words.index("-m")
    module, args = words[i + 1], words[i + 2:]
    sub = [args[0]] if module == "open_clip_po.eval" and args and not args[0].startswith("-") else []
    return [module, *sub], args[len(sub):]


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and len(lines) <= MAX_LINES
    first_block = README.read_text(encoding="utf-8").split("```bash\n", 1)[1].split("```", 1)[0]
    assert [c.split("#")[0].strip() for c in first_block.strip().splitlines()] == [
        "bash scripts/run.sh demo", "bash scripts/run.sh test"]
    assert "bash scripts/run.sh test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_every_readme_command_runs_as_written():
    checked = 0
    run_sh = (REPO / "scripts" / "run.sh").read_text()
    extras = (REPO / "pyproject.toml").read_text()
    for command in commands():
        words = [w for w in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        if words[:2] == ["bash", "scripts/run.sh"]:
            assert re.search(rf"^\s*{words[2]}\)", run_sh, flags=re.M), command
        elif words[0] == "sbatch":
            assert (REPO / words[1]).is_file(), command
        elif words[0] == "pip":
            for extra in re.findall(r"\[(\w+)\]", command):
                assert re.search(rf"^{extra} = \[", extras, flags=re.M), f"{command}: no extra {extra!r}"
        elif words[0] == "mkdir":
            continue
        else:
            call = python_module_call(words)
            assert call is not None, f"README command of an unknown kind: {command}"
            program, args = call
            known = help_text(program)
            if program == ["open_clip_po.main"]:
                known += open_clip_help()
            flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
            missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", known))
            assert not missing, f"{command}: {program} does not know {', '.join(missing)}"
        checked += 1
    assert checked >= 10  # the extraction sees the README's commands
