"""The three real typographic data sets of the paper's Table 2, in their released layouts.

- Materzynska et al. 2022 (github.com/joaanna/disentangling_spelling_in_clip): ``annotations.json`` (or
  ``annotation.json``) mapping an image file to ``{"true object": ..., "typographic attack label": ...}``, the images
  in ``images/``, optionally ``classes.json`` whose keys are the class names (else: the true objects, sorted).
  Defense-Prefix reads it from ``typographic_attack_dataset/``; its template is ``"a photo of {}."``.
- PAINT (Ilharco et al. 2022, github.com/mlfoundations/patching, ``typographic_attack_data.zip``) and RTA-100
  (Azuma & Matsui 2023, github.com/azuma164/Defense-Prefix, ``rta100.zip``): image files named
  ``label=<true class>_text=<written class>.<ext>``; the classes are every true and written name (sorted);
  template ``"a photo of a {}."``. Defense-Prefix reads them from ``typographic_real_data_from_PAINT/
  typographic_attacks/`` and ``ours/data/``.

Each reader accepts the folder itself or the sub-folder the archive or Defense-Prefix puts the files in. The
written class is known where the printed word is a class name (always for PAINT and RTA-100).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from open_clip_po.data.image_files import IMAGE_EXTENSIONS

from ..data import NO_WRITTEN_CLASS
from ..errors import EvalError

_NAMED = re.compile(r"^label=(?P<label>.+?)_text=(?P<text>.+)$")
_SUFFIXES = {"." + ext for ext in IMAGE_EXTENSIONS}
MATERZYNSKA_TEMPLATE = "a photo of {c}."
NAMED_TEMPLATE = "a photo of a {c}."


@dataclass
class RealSet:
    folder: Path
    classnames: list[str]
    samples: list[tuple[Path, int, int]]   # (image, true class, written class or -1)
    templates: list[str]


def _first(root: Path, subfolders, test) -> Path | None:
    return next((root / sub for sub in subfolders if (root / sub).is_dir() and test(root / sub)), None)


def _annotations(folder: Path) -> Path | None:
    return next((folder / n for n in ("annotations.json", "annotation.json") if (folder / n).is_file()), None)


def read_materzynska(root: str | Path) -> RealSet:
    root = Path(root)
    folder = _first(root, ("", "typographic_attack_dataset"),
                    lambda f: _annotations(f) is not None and (f / "images").is_dir())
    if folder is None:
        raise EvalError(f"materzynska: {root} does not hold the released layout: annotations.json and images/ "
                        f"(in {root} or {root}/typographic_attack_dataset)")
    try:
        annotations = json.loads(_annotations(folder).read_text(encoding="utf-8"))
        classes_file = folder / "classes.json"
        names = (list(json.loads(classes_file.read_text(encoding="utf-8"))) if classes_file.is_file()
                 else sorted({a["true object"] for a in annotations.values()}))
        index = {name: i for i, name in enumerate(names)}
        samples = [(folder / "images" / file, index[a["true object"]],
                    index.get(a.get("typographic attack label"), NO_WRITTEN_CLASS))
                   for file, a in sorted(annotations.items())]
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise EvalError(f"materzynska: cannot read {folder}'s annotations ({type(e).__name__}: {e}); expected "
                        '{"<image file>": {"true object": ..., "typographic attack label": ...}}') from None
    return RealSet(folder, names, samples, [MATERZYNSKA_TEMPLATE])


def _named_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in _SUFFIXES and p.is_file() and _NAMED.match(p.stem))


def read_named(root: str | Path, key: str, subfolders: tuple[str, ...]) -> RealSet:
    """PAINT / RTA-100: files ``label=<class>_text=<class>.<ext>``."""
    root = Path(root)
    folder = _first(root, ("",) + subfolders, lambda f: bool(_named_files(f)))
    if folder is None:
        where = ", ".join(str(root / s) for s in subfolders)
        raise EvalError(f"{key}: no image named label=<class>_text=<class>.<ext> in {root} or {where} "
                        f"(the released layout)")
    parsed = [(path, _NAMED.match(path.stem)) for path in _named_files(folder)]
    names = sorted({m["label"] for _, m in parsed} | {m["text"] for _, m in parsed})
    index = {name: i for i, name in enumerate(names)}
    samples = [(path, index[m["label"]], index[m["text"]]) for path, m in parsed]
    return RealSet(folder, names, samples, [NAMED_TEMPLATE])


def read_real_set(key: str, root: str | Path) -> RealSet:
    if not Path(root).is_dir():
        raise EvalError(f"{key}: folder not found: {root}")
    if key == "materzynska":
        return read_materzynska(root)
    if key == "paint":
        return read_named(root, key, ("typographic_attacks", "typographic_real_data_from_PAINT/typographic_attacks"))
    if key == "rta100":
        return read_named(root, key, ("data", "rta100", "ours/data"))
    raise EvalError(f"{key} is not a real typographic data set")
