"""The gender CSV: one row per image, ``image,gender,activity`` (paper Sec. 4.2), read the same way by the
builder (``open_clip_po.data.gender``) and the evaluation (``open_clip_po.eval.gender``).

Rules:
- a header row names the columns (case and surrounding spaces ignored): ``gender``, ``activity`` and the image
  path as one of ``IMAGE_COLUMNS`` (``image`` first);
- gender, case-insensitive: ``man``/``men``/``male``/``m`` mean man, ``woman``/``women``/``female``/``f``/``w``
  mean woman; anything else is an error naming file and line;
- activity and image must not be empty; image paths are relative to ``images_root`` (default: the CSV's
  folder) unless absolute.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .errors import GenderCsvError

GENDERS = {"man": "man", "men": "man", "male": "man", "m": "man",
           "woman": "woman", "women": "woman", "female": "woman", "f": "woman", "w": "woman"}
FLIP = {"man": "woman", "woman": "man"}
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file", "filename")


def _image_column(csv_path: Path, fieldnames) -> str:
    columns = [c.strip().lower() for c in (fieldnames or []) if c is not None]
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_column is None or "gender" not in columns or "activity" not in columns:
        raise GenderCsvError(f"{csv_path} needs a header with image ({'|'.join(IMAGE_COLUMNS)}), gender and "
                             f"activity columns; it has: {', '.join(columns) or 'none'}")
    return image_column


def _row(csv_path: Path, line: int, raw: dict, image_column: str, root: Path, check_images: bool) -> dict:
    row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
    gender = GENDERS.get(row["gender"].lower())
    if gender is None:
        raise GenderCsvError(f"{csv_path}:{line}: gender must be 'man' or 'woman', got {row['gender']!r} "
                             f"(accepted: {', '.join(GENDERS)})")
    if not row["activity"]:
        raise GenderCsvError(f"{csv_path}:{line}: empty activity")
    source = row[image_column]
    if not source:
        raise GenderCsvError(f"{csv_path}:{line}: empty image path")
    image = Path(source) if Path(source).is_absolute() else root / source
    if check_images and not image.is_file():
        raise GenderCsvError(f"{csv_path}:{line}: image {image} does not exist")
    return {"image": str(image), "source": source, "gender": gender, "activity": row["activity"], "line": line}


def read_gender_csv(path: str | os.PathLike, images_root: str | os.PathLike | None = None,
                    check_images: bool = False) -> list[dict]:
    """Rows ``{"image", "source", "gender" ∈ {man, woman}, "activity", "line"}``; the first bad row is an error.

    ``image`` is the resolved path, ``source`` the path as written. ``check_images``: a missing image file is an
    error too (builders; evaluation instead counts unreadable images as skipped).
    """
    csv_path = Path(path)
    root = Path(images_root) if images_root else csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            image_column = _image_column(csv_path, reader.fieldnames)
            rows = [_row(csv_path, line, raw, image_column, root, check_images)
                    for line, raw in enumerate(reader, start=2)]
    except OSError as exn:
        raise GenderCsvError(f"cannot read gender CSV {csv_path}: {exn.strerror or exn}") from None
    except UnicodeDecodeError as exn:
        raise GenderCsvError(f"gender CSV {csv_path} is not UTF-8 text: {exn.reason}") from None
    if not rows:
        raise GenderCsvError(f"{csv_path} has no rows")
    return rows
