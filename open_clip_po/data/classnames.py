"""Class names: one readable name per line, in the order of the sorted class folders.

The one reader for ``--classnames`` (builders, evaluation), ``--po-classnames`` (training) and the
``classnames.txt`` that builders write beside their shards.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ClassnamesError

CLASSNAMES_FILE = "classnames.txt"  # written beside built shards, read by evaluation when none is given


def read_classnames(path: str | os.PathLike, expected: int | None = None) -> list[str]:
    """Non-blank lines, stripped; with ``expected``, their number must match (e.g. the class folders)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exn:
        reason = exn.strerror if isinstance(exn, OSError) and exn.strerror else type(exn).__name__
        raise ClassnamesError(f"cannot read class names file {path}: {reason}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ClassnamesError(f"class names file {path} lists no class")
    if expected is not None and len(names) != expected:
        raise ClassnamesError(f"class names file {path} has {len(names)} class names but the image folder has "
                              f"{expected} classes")
    return names


def folder_to_classname(folder: str) -> str:
    return folder.replace("_", " ")


def classnames_for_folders(path: str | os.PathLike | None, folders: list[str]) -> list[str]:
    """Names from ``path`` (one per class folder, in sorted-folder order), else the folder names with _ → space."""
    if path is None:
        return [folder_to_classname(f) for f in folders]
    return read_classnames(path, expected=len(folders))
