"""Evaluation images: class folders, typographic copies, on-the-fly attacks and WebDataset shards.

Every loader yields ``(images, labels, written)`` batches; ``written`` is the class whose name is
printed on the image, ``-1`` for clean images. Unreadable samples are skipped, logged and counted
(the count comes back with the batch), never dropped silently. Shard patterns, tar streaming, image decoding,
class-name files and class folders are those of the training data layer (``open_clip_po.data``).
"""
from __future__ import annotations

import contextlib
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
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from open_clip_po.data.classnames import CLASSNAMES_FILE, classnames_for_folders, read_classnames
from open_clip_po.data.decode import decode_rgb, find_image_member
from open_clip_po.data.errors import DataError
from open_clip_po.data.image_files import list_class_folders, scan_class_folders
from open_clip_po.data.patterns import expand_shards, is_shard_spec
from open_clip_po.data.skips import SkipCounter
from open_clip_po.data.tar import read_samples
from open_clip_po.data.typographic import pick_written_class, render_attack

from .errors import EvalError

log = logging.getLogger(__name__)

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
    _, items = scan_class_folders(root)
    return [(str(path), index[classes[i]], parse_written_class(path, len(clean_classes), index[classes[i]]))
            for path, i in items]


class OnTheFlyAttack:
    """Print a wrong class name on each image, reproducibly per (seed, sample id).

    The sample id is the index in a class folder, ``<shard name>/<key>`` in shards: the attack does
    not depend on batch size, workers or shard order.
    """

    def __init__(self, classnames: Sequence[str], seed: int, fonts=None):
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
    """Every sample of ``urls`` (split by DataLoader worker only: evaluation runs on one rank, even inside a
    distributed job); a bad sample or broken shard yields ``None`` (counted by the collate function)."""

    def __init__(self, urls: Sequence[str], preprocess: Callable, num_classes: int,
                 attack: OnTheFlyAttack | None = None):
        self.urls, self.preprocess, self.num_classes, self.attack = list(urls), preprocess, num_classes, attack

    def _decode(self, sample, counter):
        ext = find_image_member(sample, counter)
        image = decode_rgb(sample, ext, counter) if ext is not None else None
        if image is None:
            return None
        try:
            label, written = _decode_label(sample)
            if not 0 <= label < self.num_classes:
                raise ValueError(f"class {label} outside 0..{self.num_classes - 1}")
        except Exception as e:  # a bad label is one bad sample, like a bad image
            log.warning("skipping sample %s:%s: %s", sample["__url__"], sample["__key__"], e)
            return False
        if self.attack is not None:
            sample_id = f"{os.path.basename(str(sample['__url__']))}/{sample['__key__']}"
            image, written = self.attack(image, label, sample_id)
        return self.preprocess(image), label, written

    def __iter__(self):
        info = get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info is not None else self.urls
        counter = SkipCounter()  # logs each skip with shard and key; the Nones carry the count
        for sample in read_samples(urls, counter):
            item = self._decode(sample, counter)
            yield from [None] * (sum(counter.drain().values()) + (item is False))
            if item:
                yield item
        yield from [None] * sum(counter.drain().values())  # broken shards


# ----------------------------------------------------------------------------------------------
# Opening sets and batching


@contextlib.contextmanager
def _as_eval_errors():
    try:
        yield
    except DataError as e:  # the evaluation CLI reports EvalError as one line
        raise EvalError(str(e)) from None


def shard_classnames(spec: str, classnames_file: str | None) -> list[str]:
    """``--classnames FILE``, else the ``classnames.txt`` that builders write beside the shards."""
    if classnames_file:
        return read_classnames(classnames_file)
    folder = spec if os.path.isdir(spec) else os.path.dirname(expand_shards(spec, flag="--images")[0][0])
    candidate = os.path.join(folder, CLASSNAMES_FILE)
    if os.path.isfile(candidate):
        return read_classnames(candidate)
    raise EvalError(f"shards {spec} need class names: pass --classnames FILE or put {CLASSNAMES_FILE} beside them")


@_as_eval_errors()
def open_eval_set(source: str, classnames: Sequence[str], preprocess: Callable, *, attack=None,
                  typographic: bool = False, clean_folders: Sequence[str] | None = None) -> EvalSet:
    """One set: shards or a class folder at ``source``; ``attack`` attacks it on the fly; ``typographic``: its
    images are attacked copies (files named ``..._written<W>``, class folders as ``clean_folders``)."""
    names, attacked = list(classnames), attack is not None or typographic
    name = Path(source.rstrip("/")).name or source
    if is_shard_spec(source):
        urls, _ = expand_shards(source, flag="--typographic" if typographic else "--images", require_all=True)
        dataset, num_samples = ShardDataset(urls, preprocess, len(names), attack), None
        description = {"source": "webdataset", "path": source, "shards": len(urls)}
    else:
        if typographic:
            samples = scan_typographic_folder(source, clean_folders)
        else:
            samples = [(str(path), index) for path, index in scan_class_folders(source)[1]]
        dataset, num_samples = FolderDataset(samples, preprocess, attack), len(samples)
        description = {"source": "folder", "path": source}
    if attack is not None:
        description = {"source": "on-the-fly", "seed": attack.seed}
    return EvalSet(name, names, dataset, attacked=attacked, num_samples=num_samples, description=description)


def _eval_classnames(images: str, folders, classnames, classnames_file) -> list[str]:
    if folders is None:  # shards
        return list(classnames) if classnames else shard_classnames(images, classnames_file)
    if classnames:
        if len(classnames) != len(folders):
            raise EvalError(f"{len(classnames)} class names given but {images} has {len(folders)} class folders")
        return list(classnames)
    return classnames_for_folders(classnames_file, folders)


def open_eval_sets(images: str, preprocess: Callable, *, typographic: str | None = None,
                   attack_seed: int | None = None, classnames: Sequence[str] | None = None,
                   classnames_file: str | None = None, fonts=None) -> tuple[EvalSet, EvalSet | None]:
    """The clean set and, if asked for, the attacked one (a typographic copy or an on-the-fly attack)."""
    if typographic is not None and attack_seed is not None:
        raise EvalError("give either a typographic folder or an on-the-fly attack seed, not both")
    with _as_eval_errors():
        folders = None if is_shard_spec(images) else list_class_folders(images)
        names = _eval_classnames(images, folders, classnames, classnames_file)
    clean = open_eval_set(images, names, preprocess)
    attacked = None
    if attack_seed is not None:
        attacked = open_eval_set(images, names, preprocess, attack=OnTheFlyAttack(names, attack_seed, fonts))
    elif typographic is not None:
        if folders is None and not is_shard_spec(typographic):
            raise EvalError(f"with shards as the clean images, the typographic set must be shards too, "
                            f"not {typographic}")
        attacked = open_eval_set(typographic, names, preprocess, typographic=True, clean_folders=folders)
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
