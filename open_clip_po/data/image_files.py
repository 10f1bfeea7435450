"""Image files: the one list of image extensions, and class folders (one sub-folder per class, as torchvision's
``ImageFolder``).

The same extensions name image members in shards (``KEY.jpg``) and image files in folders (``img.jpg``);
anything Pillow decodes is fine, and the order says which member a sample's image is when it has several.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_SUFFIXES = frozenset("." + ext for ext in IMAGE_EXTENSIONS)


def is_image_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.suffix.lower() in _SUFFIXES and path.is_file()


def list_class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class sub-folders of ``root`` (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}" if not root.exists()
                        else f"not a folder of class folders: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    return classes


def scan_class_folders(root: str | os.PathLike, empty_class: str = "error") -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folders and sorted ``(path, class index)`` items.

    ``empty_class``: ``"error"`` (evaluation: every class needs images) or ``"warn"`` (builders: a class without
    images can still be the written class of an attack).
    """
    root = Path(root)
    classes = list_class_folders(root)
    items = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in _SUFFIXES and p.is_file())
        if not files:
            message = f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            if empty_class == "error":
                raise DataError(message)
            logging.warning(message)
        items.extend((p, index) for p in files)
    if not items:
        raise DataError(f"{root} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return classes, items
