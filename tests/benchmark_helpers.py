"""Tiny data sets in the real on-disk layouts `eval benchmark` reads, and a po-tiny checkpoint.

- CLIP_benchmark's webdataset layout: ROOT/wds_<name>/test/{0..n-1}.tar (KEY.<image>, KEY.cls), nshards.txt,
  classnames.txt, zeroshot_classification_templates.txt (what `huggingface-cli download clip-benchmark/wds_...`
  gives);
- torchvision's EuroSAT: ROOT/eurosat/eurosat/2750/<Class>/<image>.jpg;
- an ImageNet split: ROOT/imagenet/val/<WordNet id>/<image>.JPEG;
- the released real typographic sets: Materzynska (annotations.json, classes.json, images/), PAINT
  (typographic_attacks/label=<c>_text=<c>.png), RTA-100 (data/label=<c>_text=<c>.jpg).
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")


def picture(seed: int, size: int = 40) -> Image.Image:
    """A small image with a colour and some blocks, different per seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size + seed % 7), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(12):
        x, y = rng.randrange(size), rng.randrange(size)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 8, y + 8))
    return image


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds_set(folder: Path, classnames, per_class: int = 3, shards: int = 1, fmt: str = "png",
                  templates=("a photo of a {c}.", "a blurry photo of a {c}."), seed: int = 0,
                  labels=None) -> int:
    """A CLIP_benchmark webdataset folder; samples go round-robin over ``shards``; returns the sample count.

    ``labels`` (optional): the stored class index of each class (e.g. ImageNet-1k indices)."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    samples = [(c, i) for i in range(per_class) for c in range(len(classnames))]
    tars = [tarfile.open(folder / "test" / f"{s}.tar", "w") for s in range(shards)]
    for n, (c, i) in enumerate(samples):
        key = f"s{n:07d}"
        tar = tars[n % shards]
        _add(tar, f"{key}.{fmt}", _encoded(picture(seed + 1000 * c + i), fmt))
        _add(tar, f"{key}.cls", str(labels[c] if labels else c).encode())
    for tar in tars:
        tar.close()
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("".join(n + "\n" for n in classnames))
    (folder / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in templates))
    return len(samples)


def write_eurosat(root: Path, per_class: int = 2) -> int:
    """torchvision's EuroSAT layout under ROOT/eurosat (the folder `--dataset-root ROOT` looks at)."""
    for c, name in enumerate(EUROSAT_FOLDERS):
        folder = root / "eurosat" / "eurosat" / "2750" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            picture(5000 + 10 * c + i, 32).save(folder / f"{name}_{i + 1}.jpg", quality=95)
    return len(EUROSAT_FOLDERS) * per_class


def write_imagenet_val(root: Path, wnids, per_class: int = 1, extra=("n01440764", "n15075141")) -> int:
    """ImageNet's val split with the given classes (plus two outside ImageNet-100, to be left out)."""
    for c, wnid in enumerate(list(wnids) + list(extra)):
        folder = root / "imagenet" / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            picture(7000 + 7 * c + i, 32).save(folder / f"ILSVRC2012_val_{c:05d}{i}.JPEG", quality=95)
    return len(wnids) * per_class


def write_materzynska(root: Path) -> list[tuple[str, str, str]]:
    """(file, true object, attack label); "good" is not a class, so its written class is unknown."""
    folder = root / "materzynska" / "typographic_attack_dataset"
    (folder / "images").mkdir(parents=True)
    rows = [("IMG_0001.JPG", "cup", "phone"), ("IMG_0002.JPG", "phone", "cup"), ("IMG_0003.JPG", "apple", "good"),
            ("IMG_0004.JPG", "cup", "apple"), ("IMG_0005.JPG", "apple", "phone")]
    for i, (file, _, _) in enumerate(rows):
        picture(9000 + i).save(folder / "images" / file, format="JPEG")
    (folder / "annotations.json").write_text(json.dumps(
        {f: {"true object": t, "typographic attack label": a} for f, t, a in rows}))
    (folder / "classes.json").write_text(json.dumps({"apple": 0, "cup": 1, "phone": 2}))
    return rows


def write_named_set(folder: Path, pairs, fmt: str) -> None:
    """PAINT / RTA-100 files ``label=<true>_text=<written>.<fmt>``."""
    folder.mkdir(parents=True)
    for i, (label, text) in enumerate(pairs):
        picture(9500 + i).save(folder / f"label={label}_text={text}.{fmt}")


PAINT_PAIRS = [("dog", "cat"), ("cat", "dog"), ("ice cream", "pizza"), ("pizza", "dog"), ("bird", "ice cream")]
RTA_PAIRS = [("lamp", "key"), ("key", "lamp"), ("mug", "key"), ("shoe", "mug")]


def save_checkpoint(model, path: Path) -> Path:
    from open_clip_po.checkpoint import atomic_save

    return atomic_save({"epoch": 1, "name": path.stem, "state_dict": {k: v.clone() for k, v in
                                                                    model.state_dict().items()}}, path)
