"""Gender-debiasing preference shards from a CSV of ``image,gender,activity`` (paper Sec. 4.2).

    python -m open_clip_po.data.gender --csv FILE --out OUT [--images-root DIR] [--seed 0]
        [--template "The {gender} is {activity}"] [--reg-template "The person is {activity}"]
        [--image-size N] [--max-count N]

For a row ``img.jpg,man,cooking``: ``OUT/pref-*.tar`` gets x = the image, y_w = "The woman is cooking" (the
gender flipped), y_l = "The man is cooking" (the original), and ``OUT/reg-*.tar`` gets the same image with the
androgynous "The person is cooking" (D_reg). ``gender`` must be ``man`` or ``woman``; image paths are relative
to ``--images-root`` (default: the CSV's folder). Also writes ``OUT/sizes.json``. Rows are shuffled with
``--seed``; the same seed and inputs give byte-identical shards.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
from functools import partial
from pathlib import Path

from ._build import ordered_map
from .shards import (META, TXT, YL, YW, ShardWriter, add_writer_args, encode_image, fit_square, format_caption,
                     load_image, writer_kwargs)

FLIP = {"man": "woman", "woman": "man"}
COLUMNS = ("image", "gender", "activity")


def read_rows(csv_path, images_root=None) -> list[dict]:
    """Validated rows ``{"path", "source", "gender", "activity", "line"}``; the first bad row is an error."""
    csv_path = Path(csv_path)
    root = Path(images_root) if images_root else csv_path.parent
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks column(s) {missing}; expected a header with {', '.join(COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            gender = (row["gender"] or "").strip().lower()
            activity = (row["activity"] or "").strip()
            source = (row["image"] or "").strip()
            if gender not in FLIP:
                raise ValueError(f"{csv_path}:{line}: gender must be 'man' or 'woman', got {row['gender']!r}")
            if not activity:
                raise ValueError(f"{csv_path}:{line}: empty activity")
            path = root / source
            if not source or not path.is_file():
                raise ValueError(f"{csv_path}:{line}: image {path} does not exist")
            rows.append({"path": path, "source": source, "gender": gender, "activity": activity, "line": line})
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    return rows


def _encode(row, image_size, image_format, quality):
    return encode_image(fit_square(load_image(row["path"], image_size), image_size), image_format, quality)


def build_gender(csv_path, out, images_root=None, template="The {gender} is {activity}",
                 reg_template="The person is {activity}", image_size=None, image_format="jpg", quality=95, seed=0,
                 max_count=10_000, max_size=3 << 30, workers=0, quiet=False) -> dict[str, int]:
    """Write pref/reg shards for gender debiasing; return ``{shard name: count}``."""
    rows = read_rows(csv_path, images_root)
    random.Random(seed).shuffle(rows)
    encode = partial(_encode, image_size=image_size, image_format=image_format, quality=quality)
    wkw = dict(max_count=max_count, max_size=max_size)
    with ShardWriter(out, "pref", **wkw) as pref, ShardWriter(out, "reg", **wkw) as reg:
        for index, (row, data) in enumerate(zip(rows, ordered_map(encode, rows, workers=workers,
                                                                  desc=f"gender → {out}", quiet=quiet))):
            y_w = format_caption(template, gender=FLIP[row["gender"]], activity=row["activity"]).encode("utf-8")
            y_l = format_caption(template, gender=row["gender"], activity=row["activity"]).encode("utf-8")
            neutral = format_caption(reg_template, activity=row["activity"]).encode("utf-8")
            meta = json.dumps({"gender": row["gender"], "activity": row["activity"], "source": row["source"]},
                              sort_keys=True).encode("utf-8")
            pref.write(f"{index:08d}", {image_format: data, YW: y_w, YL: y_l, TXT: y_w, META: meta})
            reg.write(f"{index:08d}", {image_format: data, TXT: neutral, META: meta})
    logging.info("wrote %d gender triplets and clean pairs to %s", len(rows), out)
    return {**pref.sizes, **reg.sizes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_clip_po.data.gender", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True, help="CSV with header image,gender,activity")
    parser.add_argument("--out", required=True, help="output folder for pref-*.tar, reg-*.tar, sizes.json")
    parser.add_argument("--images-root", default=None, help="folder the image paths are relative to "
                                                            "(default: the CSV's folder)")
    parser.add_argument("--template", default="The {gender} is {activity}",
                        help="triplet caption template with {gender} and {activity}")
    parser.add_argument("--reg-template", default="The person is {activity}",
                        help="D_reg caption template with {activity}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the shorter side and centre-crop to a square (default: keep size)")
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (default 0 = in-process)")
    add_writer_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_gender(args.csv, args.out, images_root=args.images_root, template=args.template,
                     reg_template=args.reg_template, image_size=args.image_size, image_format=args.image_format,
                     quality=args.quality, seed=args.seed, workers=args.workers, quiet=args.quiet,
                     **writer_kwargs(args))
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
