"""Opening one data set of the benchmark: where it is on disk, its class names and templates, and this process's
share of its images (``samples``).

Class names and templates are CLIP_benchmark's (what its ``build_dataset`` gives, or its packaged lists) unless
``--templates defense-prefix`` (Defense-Prefix's single templates, the paper's protocol), ``--template`` or
``--classnames`` say otherwise. Nothing is downloaded: a set that is not on disk is a one-line error naming the
paths looked at and how to fetch it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import braceexpand
from PIL import Image

from open_clip_po.data import imagenet100
from open_clip_po.data.errors import DataError

from ..errors import EvalError
from . import cbench
from .catalog import (REAL, BenchmarkSet, existing_dir, has_wds_split, imagenet_split_dirs, missing_message,
                      to_clip_benchmark_template, torchvision_root, wds_root)
from .real_typographic import read_real_set
from .samples import MapSamples, Prepare, WdsSamples



@dataclass
class Located:
    """A set found on disk: how it is read (``wds``, ``torchvision``, ``imagenet-folder`` or ``real``)."""
    spec: BenchmarkSet
    layout: str
    path: Path
    classnames: list[str]
    templates: list[str]
    make: Callable[[Prepare, int, int], object] = field(repr=False)  # (prepare, rank, world) → samples

    @property
    def clip_benchmark_name(self) -> str | None:
        if self.layout == "wds":
            return f"wds/{self.spec.wds}"
        return self.spec.torchvision if self.layout == "torchvision" else None

    def describe(self) -> dict:
        return {"dataset": self.clip_benchmark_name or self.spec.key, "layout": self.layout, "path": str(self.path),
                "num_classes": len(self.classnames), "classnames": self.classnames, "templates": self.templates}


class _FileLoader:
    """Index → ``(RGB image, label[, written])`` of a list ``[(path, label[, written])]`` (picklable, for
    DataLoader workers)."""

    def __init__(self, items):
        self.items = list(items)

    def __call__(self, index: int):
        path, *rest = self.items[index]
        with Image.open(path) as im:
            return (im.convert("RGB"), *rest)


def _wds_urls(folder: Path, split: str) -> list[str]:
    try:
        nshards = int((folder / split / "nshards.txt").read_text().strip())
    except ValueError:
        raise EvalError(f"{folder / split / 'nshards.txt'} does not hold a number of shards") from None
    return list(braceexpand.braceexpand(str(folder / split / f"{{0..{nshards - 1}}}.tar")))


def _locate_wds(spec, folder: Path, split: str, relabel=None, classnames=None) -> Located:
    dataset = cbench.build_dataset(f"wds/{spec.wds}", folder, split)  # reads and checks the layout's files
    names = list(classnames or dataset.classes or [])
    if not names:
        raise EvalError(f"{spec.key}: {folder} has no classnames.txt (CLIP_benchmark's wds layout needs it)")
    templates = list(dataset.templates or cbench.default_templates(spec.wds))
    urls = _wds_urls(folder, split)
    return Located(spec, "wds", folder, names, templates,
                   lambda prepare, rank, world: WdsSamples(urls, prepare, rank, world, relabel, len(names)))


def _locate_torchvision(spec, folder: Path, split: str) -> Located:
    try:
        dataset = cbench.build_dataset(spec.torchvision, folder, split)
    except (RuntimeError, FileNotFoundError, AssertionError) as e:  # torchvision: "Dataset not found ..."
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"{spec.key}: cannot read {folder} as torchvision's {spec.torchvision} ({first}); "
                        f"on a machine with a network: clip_benchmark's build_dataset('{spec.torchvision}', "
                        f"root='{folder}', download=True)") from None
    templates = list(getattr(dataset, "templates", None) or cbench.default_templates(spec.torchvision))
    size = len(dataset)
    return Located(spec, "torchvision", folder, list(dataset.classes), templates,
                   lambda prepare, rank, world: MapSamples(dataset.__getitem__, size, prepare, rank, world,
                                                           spec.key))


def _locate_imagenet100(spec, root: str, split: str) -> Located:
    names = imagenet100.classnames()
    templates = cbench.default_templates("imagenet1k")
    folders = imagenet_split_dirs(root, split)
    for folder in folders:
        if folder.is_dir():
            try:
                items = imagenet100.scan_imagenet100(folder)
            except DataError as e:
                raise EvalError(f"imagenet100: {e}") from None
            load = _FileLoader(items)
            return Located(spec, "imagenet-folder", folder, names, templates,
                           lambda prepare, rank, world: MapSamples(load, len(items), prepare, rank, world, spec.key))
    copy = Path(root) / spec.copy_folder if "{" not in root else None
    if copy is not None and has_wds_split(copy, split):  # a --save-typographic copy: the 100 classes as they are
        return _locate_wds(spec, copy, split)
    folder = wds_root(root, spec)
    if has_wds_split(folder, split):
        return _locate_wds(spec, folder, split, imagenet100.LABEL_OF_IMAGENET1K.get, names)
    raise EvalError(missing_message(spec, root, split, folders + [folder / split]))


def _locate_real(spec, root: str, split: str) -> Located:
    folder = torchvision_root(root, spec)
    if not folder.is_dir():
        raise EvalError(missing_message(spec, root, split, [folder]))
    real = read_real_set(spec.key, folder)
    load = _FileLoader(real.samples)
    return Located(spec, "real", real.folder, real.classnames, real.templates,
                   lambda prepare, rank, world: MapSamples(load, len(real.samples), prepare, rank, world, spec.key))


def locate(spec: BenchmarkSet, root: str, split: str) -> Located:
    """Find ``spec`` under ``root``: CLIP_benchmark's wds folder first, then torchvision's layout."""
    if spec.kind == REAL:
        return _locate_real(spec, root, split)
    if spec.key == "imagenet100":
        return _locate_imagenet100(spec, root, split)
    folder = wds_root(root, spec)
    if has_wds_split(folder, split):
        return _locate_wds(spec, folder, split)
    tv_folder = torchvision_root(root, spec)
    if spec.torchvision and existing_dir(tv_folder):
        return _locate_torchvision(spec, tv_folder, split)
    raise EvalError(missing_message(spec, root, split, [folder / split] + ([tv_folder] if spec.torchvision else [])))


def read_classnames_overrides(path: str | None) -> dict[str, list[str]]:
    """``--classnames FILE``: CLIP_benchmark's custom class-name JSON (data set name → list of names)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read --classnames {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise EvalError(f"--classnames {path} must map data set names to lists of class names")
    return data


def apply_overrides(located: Located, *, templates_from: str, templates: list[str] | None,
                    classnames: dict[str, list[str]]) -> Located:
    """Templates and class names in effect: CLIP_benchmark's, Defense-Prefix's, or the user's."""
    spec = located.spec
    if templates:
        located.templates = [to_clip_benchmark_template(t) for t in templates]
    elif templates_from == "defense-prefix" and spec.kind != REAL:
        located.templates = spec.defense_prefix_templates()
    keys = [spec.key] + [k for k in (located.clip_benchmark_name, spec.wds) if k]
    override = next((classnames[k] for k in keys if k in classnames), None)
    if override is not None:
        if len(override) != len(located.classnames):
            raise EvalError(f"--classnames gives {len(override)} names for {spec.key}, which has "
                            f"{len(located.classnames)} classes")
        located.classnames = [str(n) for n in override]
    return located
