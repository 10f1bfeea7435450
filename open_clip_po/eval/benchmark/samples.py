"""This process's share of a data set's images, ready for the model.

Every image has a stable index (its position in the data set: the map index, or the order of samples in the
shards). Rank r of w processes, DataLoader worker k of n, takes the images whose index i has
``i mod (w·n) = r·n + k`` (a map-style set leaves the worker split to the DataLoader), so the processes see
each image exactly once, in any number of them, and the typographic copy seeded by the index is the same image
whatever the split. Shards are read whole by every process and only its own samples are decoded.

An item is ``(views [V, 3, H, W], label, written, index, saved)``: the views are the clean image, its typographic
copy or both; ``written`` is the class printed on the image (-1 where none is known); ``saved`` is the copy's
JPEG bytes and parameters when ``--save-typographic`` asked for them. An image that cannot be read is ``None``,
counted by :func:`collate` and logged, never dropped silently.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from open_clip_po.data.decode import decode_rgb, find_image_member
from open_clip_po.data.skips import SkipCounter
from open_clip_po.data.tar import read_samples

from ..data import NO_WRITTEN_CLASS

log = logging.getLogger(__name__)
SHARD_KINDS = ("unreadable_shard", "truncated_shard")


class Prepare:
    """Raw image → item: the views the run evaluates, with the written class."""

    def __init__(self, preprocess: Callable, views: Sequence[str], attack=None, keep_copy: bool = False):
        self.preprocess, self.views, self.attack, self.keep_copy = preprocess, tuple(views), attack, keep_copy

    def __call__(self, image: Image.Image, label: int, index: int, written: int = NO_WRITTEN_CLASS):
        tensors, saved = [], None
        for view in self.views:
            if view == "attacked":
                attacked, written, data, params = self.attack(image, label, index)
                tensors.append(self.preprocess(attacked))
                if self.keep_copy:
                    saved = (data, params)
            else:  # "clean", or a real typographic image as it is
                tensors.append(self.preprocess(image))
        return torch.stack(tensors), label, written, index, saved


class MapSamples(Dataset):
    """The indices ``rank::world`` of a map-style set; ``load(i)`` → ``(PIL image, label[, written])``."""

    def __init__(self, load: Callable, size: int, prepare: Prepare, rank: int = 0, world: int = 1,
                 name: str = "data set"):
        self.load, self.prepare, self.name = load, prepare, name
        self.indices = range(rank, size, world)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        index = self.indices[position]
        try:
            image, label, *written = self.load(index)
            image = image.convert("RGB")
        except Exception as e:  # a corrupt or missing file: counted by collate, named here
            log.warning("%s: skipping unreadable image %d: %s: %s", self.name, index, type(e).__name__, e)
            return None
        return self.prepare(image, int(label), index, *written)


class WdsSamples(IterableDataset):
    """CLIP_benchmark's webdataset layout (``KEY.<image>``, ``KEY.cls``), read in shard order.

    ``relabel`` maps a stored label to the one evaluated, or to None to leave the sample out (ImageNet-100 from
    the 1000 ImageNet classes); left-out samples are not errors.
    """

    def __init__(self, urls: Sequence[str], prepare: Prepare, rank: int = 0, world: int = 1,
                 relabel: Callable[[int], int | None] | None = None, num_classes: int | None = None):
        self.urls, self.prepare, self.rank, self.world = list(urls), prepare, rank, world
        self.relabel, self.num_classes = relabel, num_classes

    def _label(self, sample) -> int | None | bool:
        """The evaluated label, None to leave the sample out, False when it has no usable one."""
        try:
            stored = int(sample["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            log.warning("skipping sample %s:%s: no usable cls entry (%s: %s)", sample["__url__"],
                        sample["__key__"], type(e).__name__, e)
            return False
        label = self.relabel(stored) if self.relabel is not None else stored
        if label is not None and self.num_classes is not None and not 0 <= label < self.num_classes:
            log.warning("skipping sample %s:%s: class %d outside 0..%d", sample["__url__"], sample["__key__"],
                        label, self.num_classes - 1)
            return False
        return label

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slots, slot = self.world * workers, self.rank * workers + worker
        counter = SkipCounter()
        for index, sample in enumerate(read_samples(self.urls, counter)):
            yield from self._shard_skips(counter, slot)
            if index % slots != slot:
                continue
            label = self._label(sample)
            if label is None:
                continue
            ext = find_image_member(sample, counter) if label is not False else None
            image = decode_rgb(sample, ext, counter) if ext is not None else None
            counter.drain()  # image problems were logged; the None below counts them
            yield None if image is None else self.prepare(image, label, index)
        yield from self._shard_skips(counter, slot)

    @staticmethod
    def _shard_skips(counter: SkipCounter, slot: int):
        # Every process reads every shard: a broken one is counted once, by the first slot.
        broken = sum(n for kind, n in counter.drain().items() if kind in SHARD_KINDS)
        yield from [None] * (broken if slot == 0 else 0)


def collate(batch):
    """Items → ``{"views", "label", "written", "index", "saved", "skipped"}`` (``views`` None if none is left)."""
    kept = [item for item in batch if item is not None]
    out = {"skipped": len(batch) - len(kept), "views": None}
    if kept:
        out["views"] = torch.stack([item[0] for item in kept])
        for position, name in ((1, "label"), (2, "written"), (3, "index")):
            out[name] = torch.tensor([item[position] for item in kept], dtype=torch.long)
        out["saved"] = [item[4] for item in kept]
    return out
