"""Gender-debiasing preference shards from a CSV of ``image,gender,activity`` (paper Sec. 4.2).

    python -m open_clip_po.data.gender --csv FILE --out OUT [--images-root DIR] [--seed 0]
        [--template "The {gender} is {activity}"] [--reg-template "The person is {activity}"]
        [--image-size N] [--max-count N]

For a row ``img.jpg,man,cooking``: ``OUT/pref-*.tar`` gets x = the image, y_w = "The woman is cooking" (the
gender flipped), y_l = "The man is cooking" (the original), and ``OUT/reg-*.tar`` gets the same image with the
androgynous "The person is cooking" (D_reg). The CSV's rules (accepted spellings of the genders, image paths
relative to ``--images-root``, default the CSV's folder) are those of ``open_clip_po.data.gender_csv``. Also
writes ``OUT/sizes.json``. Rows are shuffled with ``--seed``; the same seed and inputs give byte-identical shards.
"""
from __future__ import annotations

import json
import logging
import random
from functools import partial

from ._build import add_writer_args, builder_parser, format_caption, ordered_map, run_builder, writer_kwargs
from .gender_csv import FLIP, read_gender_csv
from .publish import StagedBuild
from .shards import META, TXT, YL, YW, ShardWriter, encode_image, fit_square, load_image


def read_rows(csv_path, images_root=None) -> list[dict]:
    """The CSV's rows (``open_clip_po.data.gender_csv``); every image must exist."""
    return read_gender_csv(csv_path, images_root, check_images=True)


def _encode(row, image_size, image_format, quality):
    return encode_image(fit_square(load_image(row["image"], image_size), image_size), image_format, quality)


def build_gender(csv_path, out, images_root=None, template="The {gender} is {activity}",
                 reg_template="The person is {activity}", image_size=None, image_format="jpg", quality=95, seed=0,
                 max_count=10_000, max_size=3 << 30, workers=0, quiet=False) -> dict[str, int]:
    """Write pref/reg shards for gender debiasing; return ``{shard name: count}``."""
    rows = read_rows(csv_path, images_root)
    random.Random(seed).shuffle(rows)
    encode = partial(_encode, image_size=image_size, image_format=image_format, quality=quality)
    wkw = dict(max_count=max_count, max_size=max_size)
    with StagedBuild(out) as build, ShardWriter(build, "pref", **wkw) as pref, \
            ShardWriter(build, "reg", **wkw) as reg:
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
    parser = builder_parser("open_clip_po.data.gender", __doc__)
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
    add_writer_args(parser)
    args = parser.parse_args(argv)
    return run_builder(lambda: build_gender(
        args.csv, args.out, images_root=args.images_root, template=args.template, reg_template=args.reg_template,
        image_size=args.image_size, **writer_kwargs(args)))


if __name__ == "__main__":
    raise SystemExit(main())
