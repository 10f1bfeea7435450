"""Write the people world to disk: captioned pre-training shards and CSV-described image folders.

- ``pretrain/`` WebDataset image-text shards (``png`` + ``txt`` + ``json``) with gender-skewed activities, read by
  open_clip's trainer as ``--dataset-type webdataset`` (its sample count from our ``sizes.json``),
- ``train/`` and ``test/``: balanced PNG images and ``people.csv`` (``image,gender,activity``), the CSV a user gives
  ``python -m open_clip_po.data.gender`` and ``python -m open_clip_po.eval gender``.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from open_clip_po.atomic import atomic_path, write_text
from open_clip_po.data.shards import META, TXT, ShardWriter, encode_image

from .grid import labelled_grid, save_grid
from .people import ACTIVITIES, GENDERS, pretrain_caption, render_person

CSV_NAME = "people.csv"


def write_people_shards(folder: Path, labels: list[tuple[str, str]], neutral_share: float, seed: int,
                        image_size: int = 64, quiet: bool = False, num_shards: int = 4,
                        hidden_share: float = 0.0) -> dict:
    """Shards ``folder/NAME-00000k.tar`` (NAME = the folder's name) of images of ``labels`` (gender, activity),
    captioned "The <gender> is <activity>" or, for ``neutral_share`` of them, "The person is <activity>"; for
    ``hidden_share`` of them the activity's object is out of frame. Returns counts per (gender, activity), of
    neutral captions and of images without the object."""
    rng = np.random.default_rng([seed, 3])
    counts = {f"{g} {a}": 0 for a in ACTIVITIES for g in GENDERS}
    counts["neutral captions"] = 0
    counts["activity out of frame"] = 0
    with ShardWriter(folder, folder.name, max_count=-(-len(labels) // num_shards)) as writer:
        for n, (gender, activity) in enumerate(tqdm(labels, desc=f"world: {folder.name} shards", disable=quiet)):
            neutral = bool(rng.random() < neutral_share)
            hidden = bool(rng.random() < hidden_share)
            img = render_person(gender, activity, rng, image_size, show_activity=not hidden)
            writer.write(f"{n:06d}", {"png": encode_image(img, "png"),
                                      TXT: pretrain_caption(gender, activity, neutral).encode("utf-8"),
                                      META: json.dumps({"gender": gender, "activity": activity,
                                                        "activity_shown": not hidden}).encode("utf-8")})
            counts[f"{gender} {activity}"] += 1
            counts["neutral captions"] += neutral
            counts["activity out of frame"] += hidden
    return counts


def write_people_folder(folder: Path, labels: list[tuple[str, str]], seed: int, image_size: int = 64,
                        quiet: bool = False) -> Path:
    """PNG images ``folder/images/NNNNN.png`` of ``labels`` and ``folder/people.csv`` describing them (paths
    relative to the CSV); returns the CSV's path."""
    rng = np.random.default_rng([seed, 4])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (gender, activity) in enumerate(tqdm(labels, desc=f"world: {folder.name}", disable=quiet)):
        name = f"images/{i:05d}.png"
        with atomic_path(folder / name) as tmp:
            render_person(gender, activity, rng, image_size).save(tmp, format="PNG")
        rows.append({"image": name, "gender": gender, "activity": activity})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=("image", "gender", "activity"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(folder / CSV_NAME, text.getvalue())


def people_grid(csv_path: Path, path: Path, image_size: int = 64, zoom: int = 2) -> Path:
    """A PNG of example images: one row per gender, one column per activity (two images each), rows and columns
    named."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cells = {}
    for row in rows:
        cells.setdefault((row["gender"], row["activity"]), []).append(csv_path.parent / row["image"])
    blank = Image.new("RGB", (image_size, image_size), "white")
    grid_rows = []
    for gender in GENDERS:
        images = []
        for activity in ACTIVITIES:
            found = [_rgb(p) for p in cells.get((gender, activity), [])[:2]]
            images += found + [blank] * (2 - len(found))
        grid_rows.append((gender, images))
    return save_grid(labelled_grid(grid_rows, image_size * zoom, columns=list(ACTIVITIES), span=2), path)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")
