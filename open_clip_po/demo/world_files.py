"""Write the demo world to disk: a captioned pre-training set (open_clip CSV) and clean class folders.

- ``pretrain/`` images of all three kinds (object / labelled / word) listed in ``pretrain.csv`` (open_clip's
  ``--dataset-type csv``: tab-separated ``filepath`` and ``title``),
- ``train/<class>/`` clean object images: input of the typographic builder (PO triplets and D_reg),
- ``test/<class>/`` clean object images for evaluation (the builder's ``--eval-out`` attacks a copy).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .world import KINDS, TextStyle, WorldClass, caption, render


def _save_png(img, path: Path) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_pretrain_set(root: Path, classes: list[WorldClass], per_class: int, mix: tuple[float, ...],
                       seed: int, style: TextStyle, image_size: int = 64, quiet: bool = False,
                       name: str = "pretrain") -> dict:
    """``root/NAME/*.png`` and ``root/NAME.csv``; returns counts per kind."""
    if len(mix) != len(KINDS) or min(mix) < 0 or sum(mix) <= 0:
        raise ValueError(f"kind mix must be {len(KINDS)} non-negative weights, got {mix}")
    rng = np.random.default_rng([seed, 1, sum(map(ord, name))])
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    p = np.asarray(mix, dtype=float) / sum(mix)
    labels = np.repeat(np.arange(len(classes)), per_class)
    kinds = rng.choice(len(KINDS), size=len(labels), p=p)
    order = rng.permutation(len(labels))
    rows, counts = [], {k: 0 for k in KINDS}
    for i in tqdm(order, desc=f"world: {name} images", disable=quiet):
        cls, kind = classes[labels[i]], KINDS[kinds[i]]
        path = folder / f"{i:06d}_{cls.name}_{kind}.png"
        distractor = None
        if kind == "sign":
            other = int(rng.integers(len(classes) - 1))
            distractor = classes[other + (other >= labels[i])]
        _save_png(render(cls, kind, rng, image_size, style, distractor=distractor), path)
        rows.append((str(path.resolve()), caption(cls, kind, rng)))
        counts[kind] += 1
    tmp = root / f".{name}.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    os.replace(tmp, root / f"{name}.csv")
    return counts


def write_class_folder(folder: Path, classes: list[WorldClass], per_class: int, seed: int, image_size: int = 64,
                       quiet: bool = False) -> int:
    """Clean object images, ``folder/<class name>/<i>.png``; returns how many were written."""
    rng = np.random.default_rng([seed, 2])
    n = 0
    for cls in tqdm(classes, desc=f"world: {folder.name}", disable=quiet):
        sub = folder / cls.name
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _save_png(render(cls, "object", rng, image_size), sub / f"{i:05d}.png")
            n += 1
    return n


def write_classnames(path: Path, classes: list[WorldClass]) -> None:
    """One class name per line, in sorted-folder order (the order the builders and evaluators use)."""
    names = sorted(c.name for c in classes)
    path.write_text("\n".join(names) + "\n", encoding="utf-8")


def describe(classes: list[WorldClass]) -> list[dict]:
    return [{"name": c.name, "shape": c.shape, "colour": c.colour} for c in sorted(classes, key=lambda c: c.name)]


def write_world_json(path: Path, classes: list[WorldClass], counts: dict) -> None:
    path.write_text(json.dumps({"classes": describe(classes), "counts": counts}, indent=2), encoding="utf-8")


def examples_grid(world: Path, path: Path, per_row: int = 10, zoom: int = 2) -> Path:
    """A PNG of example images: one row per pre-training kind, then attacked test images."""
    from PIL import Image

    def spread(paths):  # evenly across the sorted files, i.e. across classes
        paths = sorted(paths)
        return paths[::max(1, len(paths) // per_row)][:per_row]

    rows = [spread(world.glob(f"pretrain-*/*_{kind}.png")) for kind in KINDS]
    rows.append(spread((world / "test_attacked").rglob("*.png")))
    rows = [row for row in rows if row]  # no pre-training images when starting from a given checkpoint
    first = Image.open(next(p for row in rows for p in row))
    side = first.size[0] * zoom
    grid = Image.new("RGB", (side * per_row, side * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            grid.paste(Image.open(p).convert("RGB").resize((side, side), Image.NEAREST), (c * side, r * side))
    tmp = path.with_name("." + path.name + ".tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
