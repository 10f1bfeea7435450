"""Evaluation images: class folders, typographic copies, on-the-fly attacks and WebDataset shards.

Every loader yields ``(images, labels, written)`` batches; ``written`` is the class whose name is
printed on the image, ``-1`` for clean images. Unreadable samples are skipped, logged and counted
(the count comes back with the batch), never dropped silently.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .errors import EvalError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
NO_WRITTEN_CLASS = -1


@dataclass
class EvalSet:
    """One set of evaluation images and what is known about them."""
    name: str
    classnames: list[str]
    dataset: Dataset | IterableDataset
    attacked: bool                       # images carry a written (typographic) class
    num_samples: int | None = None       # None for shards (not known before reading)
    description: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Class folders


def list_class_folders(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.exists():
        raise EvalError(f"image folder not found: {root}")
    if not root.is_dir():
        raise EvalError(f"not a folder of class folders: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EvalError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    return classes


def list_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise EvalError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def folder_to_classname(folder: str) -> str:
    return folder.replace("_", " ")


def read_classnames(path: str | os.PathLike, expected: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"classnames file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise EvalError(f"classnames file {path} is empty")
    if expected is not None and len(names) != expected:
        raise EvalError(f"classnames file {path} has {len(names)} names but the images have {expected} classes")
    return names


def scan_class_folder(root) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class folder names sorted, [(path, class index)])``; errors on empty folders."""
    classes = list_class_folders(root)
    samples = [(str(path), index) for index, name in enumerate(classes) for path in list_images(Path(root) / name)]
    return classes, samples


# open_clip_po.data.typographic --eval-out names files ``<stem>_true<T>_written<W>.png``.
_WRITTEN_RE = re.compile(r"(?:^|_)(?:true(?P<true>\d+)_)?written[-_]?(?P<written>\d+)$")


def parse_written_class(path: str | os.PathLike, num_classes: int, true_index: int | None = None) -> int:
    """The written class index recorded in an attacked image's file name (checked against its folder)."""
    match = _WRITTEN_RE.search(Path(path).stem)
    if match is None:
        raise EvalError(f"cannot tell the written class of {path}: its name does not end in '_written<class index>'")
    written = int(match.group("written"))
    if not 0 <= written < num_classes:
        raise EvalError(f"{path} names written class {written}, outside 0..{num_classes - 1}")
    if true_index is not None and match.group("true") is not None and int(match.group("true")) != true_index:
        raise EvalError(f"{path} names true class {match.group('true')} but lies in the folder of class {true_index}"
                        " (class folders ordered differently?)")
    return written


def scan_typographic_folder(root, clean_classes: Sequence[str]) -> list[tuple[str, int, int]]:
    """``[(path, true class, written class)]`` for an attacked copy with the clean set's class folders."""
    classes = list_class_folders(root)
    missing = sorted(set(clean_classes) - set(classes))
    extra = sorted(set(classes) - set(clean_classes))
    if missing:
        raise EvalError(f"typographic folder {root} lacks class folder {missing[0]!r} of the clean set "
                        f"({len(missing)} missing)")
    if extra:
        raise EvalError(f"typographic folder {root} has class folder {extra[0]!r} that the clean set lacks")
    index = {name: i for i, name in enumerate(clean_classes)}
    return [(str(path), index[name], parse_written_class(path, len(clean_classes), index[name]))
            for name in classes for path in list_images(Path(root) / name)]


class OnTheFlyAttack:
    """Print a wrong class name on each image, reproducibly per (seed, sample id).

    The sample id is the index in a class folder, ``<shard name>/<key>`` in shards: the attack does
    not depend on batch size, workers or shard order.
    """

    def __init__(self, classnames: Sequence[str], seed: int, fonts=None):
        from open_clip_po.data.typographic import pick_written_class, render_attack

        self.classnames, self.seed, self.fonts = list(classnames), int(seed), fonts
        self._pick, self._render = pick_written_class, render_attack

    def __call__(self, image: Image.Image, label: int, sample_id) -> tuple[Image.Image, int]:
        rng = random.Random(f"{self.seed}:{sample_id}")
        written = self._pick(label, len(self.classnames), rng)
        attacked, _params = self._render(image, self.classnames[written], rng, fonts=self.fonts)
        return attacked, written


class FolderDataset(Dataset):
    def __init__(self, samples: Sequence[tuple], preprocess: Callable, attack: OnTheFlyAttack | None = None):
        self.samples, self.preprocess, self.attack = list(samples), preprocess, attack

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label, *rest = self.samples[index]
        written = rest[0] if rest else NO_WRITTEN_CLASS
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:  # corrupt or truncated file: skip, count, say which
            log.warning("skipping unreadable image %s: %s", path, e)
            return None
        if self.attack is not None:
            image, written = self.attack(image, label, index)
        return self.preprocess(image), label, written


# ----------------------------------------------------------------------------------------------
# WebDataset shards (``cls`` = true class index; optional ``json`` with ``label`` and ``written``)


def is_shard_spec(spec: str) -> bool:
    return spec.endswith(".tar") or any(c in spec for c in "{*?") or "::" in spec or (
        os.path.isdir(spec) and bool(glob.glob(os.path.join(spec, "*.tar"))))


def expand_shards(spec: str) -> list[str]:
    import braceexpand

    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
        # Shell-style patterns (quoted, e.g. 'OUT/pref-*.tar') are expanded here, sorted.
        urls = [m for u in urls for m in (sorted(glob.glob(u)) if any(c in u for c in "*?[") else [u])]
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if missing:
        raise EvalError(f"shard not found: {missing[0]}" + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
    if not urls:
        raise EvalError(f"no shards in {spec}")
    return urls


def shard_classnames(spec: str, classnames_file: str | None) -> list[str]:
    if classnames_file:
        return read_classnames(classnames_file)
    folder = spec if os.path.isdir(spec) else os.path.dirname(expand_shards(spec)[0])
    candidate = os.path.join(folder, "classnames.txt")
    if os.path.isfile(candidate):
        return read_classnames(candidate)
    raise EvalError(f"shards {spec} need class names: pass --classnames FILE or put classnames.txt beside them")


def _decode_label(sample: dict) -> tuple[int, int]:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if "cls" in sample:
        label = int(sample["cls"].decode() if isinstance(sample["cls"], bytes) else sample["cls"])
    elif "label" in meta:
        label = int(meta["label"])
    else:
        raise KeyError("no 'cls' entry and no 'label' in 'json'")
    written = meta.get("written", NO_WRITTEN_CLASS)
    return label, int(NO_WRITTEN_CLASS if written is None else written)


class ShardDataset(IterableDataset):
    def __init__(self, urls: Sequence[str], preprocess: Callable, num_classes: int,
                 attack: OnTheFlyAttack | None = None):
        self.urls, self.preprocess, self.num_classes, self.attack = list(urls), preprocess, num_classes, attack

    def __iter__(self):
        import webdataset as wds

        # Decode by hand so a bad sample is counted rather than swallowed by a handler.
        # Every caller reads every shard: evaluation runs on one rank, even inside a distributed job.
        # Built from webdataset's stages (same API in 0.2.x and 1.x): all shards, split by worker only.
        pipeline = wds.DataPipeline(wds.SimpleShardList(self.urls), wds.split_by_worker, wds.tarfile_to_samples())
        for sample in pipeline:
            if "__key__" not in sample:   # webdataset's end-of-shard marker, not a sample
                continue
            key = f"{sample.get('__url__', '?')}:{sample['__key__']}"
            try:
                image_key = next(k for k in SHARD_IMAGE_KEYS if k in sample)
                with Image.open(io.BytesIO(sample[image_key])) as im:
                    image = im.convert("RGB")
                label, written = _decode_label(sample)
                if not 0 <= label < self.num_classes:
                    raise ValueError(f"class {label} outside 0..{self.num_classes - 1}")
            except StopIteration:
                log.warning("skipping sample %s: no image (%s)", key, "/".join(SHARD_IMAGE_KEYS))
                yield None
                continue
            except Exception as e:
                log.warning("skipping sample %s: %s", key, e)
                yield None
                continue
            if self.attack is not None:
                sample_id = f"{os.path.basename(str(sample.get('__url__', '')))}/{sample['__key__']}"
                image, written = self.attack(image, label, sample_id)
            yield self.preprocess(image), label, written


# ----------------------------------------------------------------------------------------------
# Opening sets and batching


def open_eval_sets(images: str, preprocess: Callable, *, typographic: str | None = None,
                   attack_seed: int | None = None, classnames: Sequence[str] | None = None,
                   classnames_file: str | None = None, fonts=None) -> tuple[EvalSet, EvalSet | None]:
    """The clean set and, if asked for, the attacked one (a typographic copy or an on-the-fly attack)."""
    if typographic is not None and attack_seed is not None:
        raise EvalError("give either a typographic folder or an on-the-fly attack seed, not both")
    name = Path(images.rstrip("/")).name or images
    if is_shard_spec(images):
        names = list(classnames) if classnames else shard_classnames(images, classnames_file)
        urls = expand_shards(images)
        clean = EvalSet(name, names, ShardDataset(urls, preprocess, len(names)), attacked=False,
                        description={"source": "webdataset", "shards": len(urls)})
        attacked = None
        if attack_seed is not None:
            attack = OnTheFlyAttack(names, attack_seed, fonts)
            attacked = EvalSet(name, names, ShardDataset(urls, preprocess, len(names), attack), attacked=True,
                               description={"source": "on-the-fly", "seed": attack_seed})
        elif typographic is not None:
            if not is_shard_spec(typographic):
                raise EvalError(f"with shards as the clean images, the typographic set must be shards too, "
                                f"not {typographic}")
            attacked = EvalSet(Path(typographic).name, names,
                               ShardDataset(expand_shards(typographic), preprocess, len(names)), attacked=True,
                               description={"source": "webdataset", "path": typographic})
        return clean, attacked

    folders, samples = scan_class_folder(images)
    if classnames:
        names = list(classnames)
        if len(names) != len(folders):
            raise EvalError(f"{len(names)} class names given but {images} has {len(folders)} class folders")
    elif classnames_file:
        names = read_classnames(classnames_file, expected=len(folders))
    else:
        names = [folder_to_classname(f) for f in folders]
    clean = EvalSet(name, names, FolderDataset(samples, preprocess), attacked=False, num_samples=len(samples),
                    description={"source": "folder", "path": images})
    attacked = None
    if attack_seed is not None:
        attacked = EvalSet(name, names, FolderDataset(samples, preprocess, OnTheFlyAttack(names, attack_seed, fonts)),
                           attacked=True, num_samples=len(samples),
                           description={"source": "on-the-fly", "seed": attack_seed})
    elif typographic is not None:
        if is_shard_spec(typographic):
            attacked = EvalSet(Path(typographic).name, names,
                               ShardDataset(expand_shards(typographic), preprocess, len(names)), attacked=True,
                               description={"source": "webdataset", "path": typographic})
        else:
            attacked_samples = scan_typographic_folder(typographic, folders)
            attacked = EvalSet(Path(typographic).name, names, FolderDataset(attacked_samples, preprocess),
                               attacked=True, num_samples=len(attacked_samples),
                               description={"source": "folder", "path": typographic})
    return clean, attacked


def collate_counting_skips(batch):
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, None, skipped
    images = torch.stack([item[0] for item in kept])
    labels = torch.tensor([item[1] for item in kept], dtype=torch.long)
    written = torch.tensor([item[2] for item in kept], dtype=torch.long)
    return images, labels, written, skipped


def make_loader(eval_set: EvalSet, batch_size: int = 64, workers: int = 0) -> DataLoader:
    return DataLoader(eval_set.dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_counting_skips, persistent_workers=False)
