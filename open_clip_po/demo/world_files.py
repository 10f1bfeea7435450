"""Write the demo world to disk: captioned pre-training shards and clean class folders.

- ``pretrain-STAGE/`` WebDataset image-text shards of all four kinds (object / labelled / word / sign), read by
  open_clip's trainer as ``--dataset-type webdataset`` (its sample count from our ``sizes.json``),
- ``train/<class>/`` clean object images: input of the typographic builder (PO triplets and D_reg),
- ``test/<class>/`` clean object images for evaluation (the builder's ``--eval-out`` attacks a copy).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from open_clip_po.atomic import atomic_path
from open_clip_po.data.reader import group_members, iter_tar_members
from open_clip_po.data.shards import META, TXT, ShardWriter, encode_image
from open_clip_po.data.skips import SkipCounter

from .grid import labelled_grid, save_grid
from .world import KINDS, TextStyle, WorldClass, caption, render


def _save_png(img, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_pretrain_set(root: Path, classes: list[WorldClass], per_class: int, mix: tuple[float, ...],
                       seed: int, style: TextStyle, image_size: int = 64, quiet: bool = False,
                       name: str = "pretrain", num_shards: int = 4) -> dict:
    """Image-text shards ``root/NAME/NAME-00000k.tar`` (open_clip pairs: ``png`` + ``txt``, and ``json`` with the
    class and the image kind) and ``sizes.json``, written with ``open_clip_po.data.shards.ShardWriter`` so
    open_clip's trainer reads them with ``--dataset-type webdataset``; returns counts per kind."""
    if len(mix) != len(KINDS) or min(mix) < 0 or sum(mix) <= 0:
        raise ValueError(f"kind mix must be {len(KINDS)} non-negative weights, got {mix}")
    rng = np.random.default_rng([seed, 1, sum(map(ord, name))])
    p = np.asarray(mix, dtype=float) / sum(mix)
    labels = np.repeat(np.arange(len(classes)), per_class)
    kinds = rng.choice(len(KINDS), size=len(labels), p=p)
    order = rng.permutation(len(labels))  # shards hold the classes mixed: open_clip's shuffle buffer is finite
    counts = {k: 0 for k in KINDS}
    with ShardWriter(root / name, name, max_count=-(-len(labels) // num_shards)) as writer:
        for n, i in enumerate(tqdm(order, desc=f"world: {name} shards", disable=quiet)):
            cls, kind = classes[labels[i]], KINDS[kinds[i]]
            distractor = None
            if kind == "sign":
                other = int(rng.integers(len(classes) - 1))
                distractor = classes[other + (other >= labels[i])]
            img = render(cls, kind, rng, image_size, style, distractor=distractor)
            writer.write(f"{n:06d}", {"png": encode_image(img, "png"),
                                      TXT: caption(cls, kind, rng).encode("utf-8"),
                                      META: json.dumps({"class": cls.name, "kind": kind}).encode("utf-8")})
            counts[kind] += 1
    return counts


def shard_examples(folders: list[Path], kind: str, n: int) -> list[Image.Image]:
    """The first ``n`` images of one kind in pre-training shards (for the examples grid), read with the triplet
    reader's own tar stages."""
    shards = sorted(s for folder in folders for s in folder.glob("*.tar"))
    sources = ({"url": str(s), "stream": open(s, "rb")} for s in shards)
    found = []
    for sample in group_members(iter_tar_members(sources, SkipCounter())):
        if json.loads(sample[META])["kind"] == kind:
            found.append(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            if len(found) == n:
                break
    return found


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
    """A PNG of example images, each row named: one row per pre-training kind, then attacked test images."""
    def spread(paths):  # evenly across the sorted files, i.e. across classes
        paths = sorted(paths)
        return [Image.open(p).convert("RGB") for p in paths[::max(1, len(paths) // per_row)][:per_row]]

    stages = sorted(p for p in world.glob("pretrain-*") if p.is_dir())
    rows = [(kind, shard_examples(stages, kind, per_row)) for kind in KINDS]
    rows.append(("attacked test", spread((world / "test_attacked").rglob("*.png"))))
    rows = [(label, row) for label, row in rows if row]  # no pre-training images when starting from a checkpoint
    return save_grid(labelled_grid(rows, rows[0][1][0].size[0] * zoom), path)
