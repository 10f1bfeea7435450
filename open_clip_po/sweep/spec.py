"""A sweep description (TOML) and its expansion into runs.

    name = "demo"                  # optional: the SLURM job name and the report's title
    [base]                         # open_clip_po.main flags shared by every run (without the leading --)
    model = "po-tiny"
    train-data = "shards/pref-{000000..000003}.tar"
    [axes]                         # one run per combination (cartesian product), in this order
    po-loss = ["dpo", "ipo"]
    lr = ["1e-3", "3e-4"]
    po-linear-head = [false, true] # a boolean flag: true = present, false = absent
    [[points]]                     # optional: extra runs, base + these flags
    po-loss = "ce"
    [eval]                         # evaluation after training (see EVAL_KEYS)
    images = "test"
    typographic = "test_attacked"
    [launch]                       # local launcher only
    nproc = 1                      # processes per run (torchrun when > 1)

Flag values: a string or number is passed as written by ``str()`` (write ``"1e-3"`` to keep the spelling), a
list gives several values after one flag, ``true``/``false`` a bare flag or none.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class GridError(ValueError):
    """A sweep description that cannot be expanded; the message names the file and the key."""


TOP_KEYS = {"name", "base", "axes", "points", "eval", "launch"}
# Set by the sweep itself for every run: a run's folder is RUNS_DIR/NAME.
RESERVED_FLAGS = {"name", "logs", "logs-dir"}
EVAL_KEYS = {
    "images": "clean images, any --images form of python -m open_clip_po.eval (required)",
    "typographic": "their attacked copy (or attack-on-the-fly = true)",
    "attack-on-the-fly": "attack the clean images while reading, seeded by attack-seed",
    "attack-seed": "seed of the on-the-fly attack (default 0)",
    "classnames": "class-name file (default: folder names / classnames.txt beside shards)",
    "template": "prompt template(s) with {} (a string or a list)",
    "templates-for": "a template family instead (pets, food, imagenet, ...)",
    "reference": "reference for the KL (default: base pretrained; head runs: their own backbone)",
    "t": "t grid of the t-sweep for --po-linear-head runs (default -2:3:0.5)",
    "weights": "raw | bma | ema (default raw)",
    "batch-size": "evaluation batch size (default 64)",
    "workers": "DataLoader workers (default 0)",
    "device": "default: cuda if available, else cpu",
}
LAUNCH_KEYS = {"nproc"}
FLAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# How a setting reads in a run's name: po-loss=dpo → "dpo", lr=0.001 → "lr0.001", po-linear-head → "head"/"full".
NAME_PREFIX = {"po-loss": "", "po-beta": "beta", "po-reg-lambda": "lambda", "lr": "lr", "epochs": "ep",
               "seed": "seed", "wd": "wd", "batch-size": "bs", "po-average": ""}
BOOL_NAMES = {"po-linear-head": ("head", "full")}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: its index in the expansion, its folder name and the flags that make it."""
    index: int
    name: str
    settings: dict      # the values that vary between runs (axes / point keys), in name order
    flags: dict         # base + settings: every open_clip_po.main flag of the run

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "settings": self.settings, "flags": self.flags}


@dataclasses.dataclass(frozen=True)
class Grid:
    path: str
    name: str
    base: dict
    axes: dict
    points: list
    eval: dict
    launch: dict

    def runs(self) -> list[Run]:
        return expand(self)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _flag_key(where: str, key: str) -> str:
    key = key[2:] if key.startswith("--") else key
    if not FLAG.fullmatch(key):
        raise GridError(f"{where}: {key!r} is not a flag name")
    if key in RESERVED_FLAGS:
        raise GridError(f"{where}: --{key} is set by the sweep (each run is RUNS_DIR/<run name>); remove it")
    return key


def _check_value(where: str, value) -> None:
    ok = (str, int, float, bool)
    if isinstance(value, list):
        if not value or not all(isinstance(v, ok) and not isinstance(v, bool) for v in value):
            raise GridError(f"{where}: a list value must hold strings or numbers")
    elif not isinstance(value, ok):
        raise GridError(f"{where}: {type(value).__name__} is not a flag value (string, number, boolean or list)")


def _flags(where: str, table) -> dict:
    if not isinstance(table, dict):
        raise GridError(f"{where} must be a table")
    out = {}
    for key, value in table.items():
        flag = _flag_key(where, key)
        _check_value(f"{where}.{flag}", value)
        out[flag] = value
    return out


def _axes(path: str, table, base: dict) -> dict:
    if not isinstance(table, dict):
        raise GridError(f"{path}: [axes] must be a table")
    axes = {}
    for key, values in table.items():
        flag = _flag_key(f"{path} [axes]", key)
        if not isinstance(values, list) or not values:
            raise GridError(f"{path} [axes].{flag}: give a non-empty list of values, e.g. {flag} = [1, 2]")
        for v in values:
            _check_value(f"{path} [axes].{flag}", v)
        if flag in base:
            raise GridError(f"{path}: --{flag} is in both [base] and [axes]; keep one")
        axes[flag] = values
    return axes


def _eval_table(path: str, table) -> dict:
    if not isinstance(table, dict):
        raise GridError(f"{path}: [eval] must be a table")
    unknown = set(table) - set(EVAL_KEYS)
    if unknown:
        raise GridError(f"{path} [eval]: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(EVAL_KEYS)})")
    if "images" not in table:
        raise GridError(f"{path} [eval]: images = ... (the clean evaluation set) is required")
    if ("typographic" in table) == bool(table.get("attack-on-the-fly")):
        raise GridError(f"{path} [eval]: give exactly one of typographic = ... and attack-on-the-fly = true")
    return table


def _launch_table(path: str, table) -> dict:
    if not isinstance(table, dict) or set(table) - LAUNCH_KEYS:
        raise GridError(f"{path} [launch]: known keys: {', '.join(sorted(LAUNCH_KEYS))}")
    nproc = table.get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise GridError(f"{path} [launch].nproc must be a whole number >= 1")
    return table


def grid_from_dict(raw: dict, path: str = "<grid>") -> Grid:
    """Check a parsed grid file; every problem is a GridError naming the file and the key."""
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    base = _flags(f"{path} [base]", raw.get("base", {}))
    axes = _axes(path, raw.get("axes", {}), base)
    points = raw.get("points", [])
    if not isinstance(points, list):
        raise GridError(f"{path}: points must be an array of tables ([[points]])")
    points = [_flags(f"{path} [[points]] #{i + 1}", p) for i, p in enumerate(points)]
    if not axes and not points:
        raise GridError(f"{path}: no runs: give [axes] or [[points]]")
    grid = Grid(path=str(path), name=str(raw.get("name", Path(path).stem)), base=base, axes=axes, points=points,
                eval=_eval_table(path, raw.get("eval", {})), launch=_launch_table(path, raw.get("launch", {})))
    grid.runs()  # names must be unique: refuse the grid now, not when it is launched
    return grid


def load_grid(path: str | Path) -> Grid:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise GridError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise GridError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # tomllib decodes the bytes itself and names no file
        raise GridError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                        "TOML files are UTF-8: save it as UTF-8") from None
    return grid_from_dict(raw, str(Path(path).resolve()))


def format_value(value) -> str:
    """A flag value as it goes on the command line: ``str()``, so 1e-3 → "0.001", 3e-5 → "3e-05"."""
    return str(value)


def name_token(flag: str, value) -> str:
    if isinstance(value, bool):
        yes, no = BOOL_NAMES.get(flag, (flag, f"no-{flag}"))
        return yes if value else no
    text = "+".join(map(format_value, value)) if isinstance(value, list) else format_value(value)
    prefix = NAME_PREFIX.get(flag, f"{flag}-")
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", prefix + text)


def main_argv(flags: dict) -> list[str]:
    """open_clip_po.main arguments for a flag dict (booleans: bare flag or nothing)."""
    argv = []
    for flag, value in flags.items():
        if value is True:
            argv.append(f"--{flag}")
        elif value is False:
            continue
        elif isinstance(value, list):
            argv += [f"--{flag}", *map(format_value, value)]
        else:
            argv += [f"--{flag}", format_value(value)]
    return argv


def expand(grid: Grid) -> list[Run]:
    """The cartesian product of the axes (first axis slowest), then the explicit points."""
    combos = [dict(zip(grid.axes, values)) for values in itertools.product(*grid.axes.values())] if grid.axes else []
    combos += [dict(p) for p in grid.points]
    # Name order: the axes, then keys that only points set, in order of first appearance.
    order = list(grid.axes)
    for point in grid.points:
        order += [k for k in point if k not in order]
    runs, seen = [], {}
    for index, combo in enumerate(combos):
        settings = {k: combo[k] for k in order if k in combo}
        name = "_".join(name_token(k, v) for k, v in settings.items()) or "base"
        if name in seen:
            raise GridError(f"{grid.path}: runs #{seen[name] + 1} and #{index + 1} are both named {name!r} "
                            "(a point repeats an axis combination?)")
        seen[name] = index
        runs.append(Run(index=index, name=name, settings=settings, flags={**grid.base, **combo}))
    return runs
