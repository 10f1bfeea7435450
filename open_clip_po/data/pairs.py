"""Clean image-text shards (open_clip's ``jpg`` + ``txt``) from an image folder with one sub-folder per class.

Use them as D_reg (``--po-reg-data``) or to pre-train a small model with stock open_clip.

    python -m open_clip_po.data.pairs --images DIR --out OUT [--template "a photo of a {}."]
        [--classnames FILE] [--image-size N] [--prefix pairs] [--max-count N] [--seed 0]

Writes ``OUT/PREFIX-000000.tar ...`` (members ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` with ``label`` and
``source``), ``OUT/sizes.json`` and ``OUT/classnames.txt``. Sample order is shuffled with ``--seed``; the same
seed and inputs give byte-identical shards.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from functools import partial
from pathlib import Path

from ._build import ordered_map, write_lines
from .shards import (META, TXT, ShardWriter, add_writer_args, encode_image, fit_square, format_caption,
                     load_classnames, load_image, scan_image_folder, writer_kwargs)


def _encode(item, image_size, image_format, quality, root):
    path, label = item
    image = fit_square(load_image(path, image_size), image_size)
    return encode_image(image, image_format, quality), label, str(Path(path).relative_to(root))


def build_pairs(images, out, template="a photo of a {}.", classnames=None, image_size=None, prefix="pairs",
                image_format="jpg", quality=95, seed=0, max_count=10_000, max_size=3 << 30, workers=0,
                quiet=False) -> dict[str, int]:
    """Write clean pair shards; return ``{shard name: count}``."""
    folders, items = scan_image_folder(images)
    names = load_classnames(classnames, folders)
    random.Random(seed).shuffle(items)
    encode = partial(_encode, image_size=image_size, image_format=image_format, quality=quality,
                     root=Path(images))
    with ShardWriter(out, prefix, max_count=max_count, max_size=max_size) as writer:
        for index, (data, label, source) in enumerate(
                ordered_map(encode, items, workers=workers, desc=f"pairs → {out}", quiet=quiet)):
            caption = format_caption(template, classname=names[label])
            writer.write(f"{index:08d}", {
                image_format: data,
                TXT: caption.encode("utf-8"),
                META: json.dumps({"label": label, "source": source}, sort_keys=True).encode("utf-8"),
            })
    write_lines(Path(out) / "classnames.txt", names)
    logging.info("wrote %d samples in %d shard(s) to %s", len(items), len(writer.sizes), out)
    return writer.sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_clip_po.data.pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="image folder: DIR/<class>/<image>")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--template", default="a photo of a {}.", help="caption template, {} = class name")
    parser.add_argument("--classnames", default=None,
                        help="text file, one readable class name per line in sorted-folder order "
                             "(default: folder names with _ as space)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the shorter side and centre-crop to a square (default: keep size)")
    parser.add_argument("--prefix", default="pairs", help="shard name prefix (default pairs)")
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (default 0 = in-process)")
    add_writer_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_pairs(args.images, args.out, template=args.template, classnames=args.classnames,
                    image_size=args.image_size, prefix=args.prefix, image_format=args.image_format,
                    quality=args.quality, seed=args.seed, workers=args.workers, quiet=args.quiet,
                    **writer_kwargs(args))
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
