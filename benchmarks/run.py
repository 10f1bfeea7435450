"""Run every ``benchmarks/bench_*.py`` and write BENCHMARKS.md.

Each module defines ``run(quick: bool) -> list[dict]``; a row has
``name`` (what was measured), ``value`` (a number, usually a ratio measured in this one run),
``unit``, ``goal`` (text such as "<= 1.35"), ``met`` (bool or None) and ``details`` (model,
batch size, repeats, raw medians). These are measurements, never pass/fail tests.

    python benchmarks/run.py [--quick] [--only NAME ...] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(module)
    return module


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """A BENCHMARKS.md split into its header and its ``## name`` sections, in order."""
    parts = text.split("\n## ")
    return parts[0], {part.split("\n", 1)[0]: "## " + part for part in parts[1:]}


def keep_other_sections(old: str, new: str, measured: list[str]) -> str:
    """``--only``: the sections just measured replace theirs; the others, and their dates, stay as they were."""
    old_header, old_sections = _sections(old)
    new_header, new_sections = _sections(new)
    when = new_header.split("Measured ", 1)[1].split(" on ", 1)[0] if "Measured " in new_header else "?"
    names = ", ".join(stem.removeprefix("bench_") for stem in measured)
    header = old_header.rstrip("\n") + f"\nSection(s) {names} re-measured {when} (`python benchmarks/run.py --only`).\n"
    merged = {**old_sections, **new_sections}
    return header + "\n" + "\n".join(section.rstrip("\n") + "\n" for section in merged.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="bench_NAME modules to run")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    import torch

    files = sorted(HERE.glob("bench_*.py"))
    if args.only:
        files = [f for f in files if f.stem.removeprefix("bench_") in args.only or f.stem in args.only]
    sections = []
    for path in files:
        print(f"== {path.stem}", flush=True)
        threads = torch.get_num_threads()
        try:
            rows = load(path).run(quick=args.quick)
        except Exception:  # a broken benchmark is reported, the others still run
            traceback.print_exc()
            rows = [{"name": path.stem, "value": None, "unit": "", "goal": "", "met": None,
                     "details": "FAILED: " + traceback.format_exc().strip().splitlines()[-1]}]
        finally:
            torch.set_num_threads(threads)  # a benchmark that pins threads must not slow the next one
        for row in rows:
            print(json.dumps(row, default=str), flush=True)
        sections.append((path.stem, rows))

    lines = [
        "# Benchmarks",
        "",
        f"Measured {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine()}.",
        "Ratios are measured within one run (same process, same inputs), medians over repeats.",
        "Regenerate with `python benchmarks/run.py` (add `--quick` for a smoke run). Never a CI gate.",
        "",
    ]
    for stem, rows in sections:
        lines += [f"## {stem.removeprefix('bench_')}", "", "| measurement | value | goal | met | details |",
                  "|---|---|---|---|---|"]
        for r in rows:
            value = r.get("value")
            shown = "—" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
            met = {True: "yes", False: "**no**", None: "—"}[r.get("met")]
            lines.append(f"| {r['name']} | {shown} {r.get('unit', '')} | {r.get('goal', '')} | {met} | "
                         f"{r.get('details', '')} |")
        lines.append("")
    if args.quick:
        lines.insert(3, "**Quick run: few repeats, figures are rough.**")
    text = "\n".join(lines)
    if args.only and Path(args.out).exists():
        text = keep_other_sections(Path(args.out).read_text(), text, [stem for stem, _ in sections])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
