"""Clean image-text shards (open_clip's ``jpg`` + ``txt``) from an image folder with one sub-folder per class.

Use them as D_reg (``--po-reg-data``) or to pre-train a small model with stock open_clip.

    python -m open_clip_po.data.pairs --images DIR --out OUT [--template "a photo of a {}."]
        [--classnames FILE] [--image-size N] [--prefix pairs] [--max-count N] [--seed 0]

Writes ``OUT/PREFIX-000000.tar ...`` (members ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` with ``label`` and
``source``), ``OUT/sizes.json`` and ``OUT/classnames.txt``. Sample order is shuffled with ``--seed``; the same
seed and inputs give byte-identical shards.
"""
from __future__ import annotations

import json
import logging
import random
from functools import partial
from pathlib import Path

from ._build import (add_writer_args, builder_parser, format_caption, ordered_map, run_builder, write_lines,
                     writer_kwargs)
from .classnames import CLASSNAMES_FILE, classnames_for_folders
from .image_files import scan_class_folders
from .publish import StagedBuild
from .shards import META, TXT, ShardWriter, encode_image, fit_square, load_image


def _encode(item, image_size, image_format, quality, root):
    path, label = item
    image = fit_square(load_image(path, image_size), image_size)
    return encode_image(image, image_format, quality), label, str(Path(path).relative_to(root))


def build_pairs(images, out, template="a photo of a {}.", classnames=None, image_size=None, prefix="pairs",
                image_format="jpg", quality=95, seed=0, max_count=10_000, max_size=3 << 30, workers=0,
                quiet=False) -> dict[str, int]:
    """Write clean pair shards; return ``{shard name: count}``."""
    folders, items = scan_class_folders(images, empty_class="warn")
    names = classnames_for_folders(classnames, folders)
    random.Random(seed).shuffle(items)
    encode = partial(_encode, image_size=image_size, image_format=image_format, quality=quality,
                     root=Path(images))
    with StagedBuild(out) as build:
        with ShardWriter(build, prefix, max_count=max_count, max_size=max_size) as writer:
            for index, (data, label, source) in enumerate(
                    ordered_map(encode, items, workers=workers, desc=f"pairs → {out}", quiet=quiet)):
                caption = format_caption(template, classname=names[label])
                writer.write(f"{index:08d}", {
                    image_format: data,
                    TXT: caption.encode("utf-8"),
                    META: json.dumps({"label": label, "source": source}, sort_keys=True).encode("utf-8"),
                })
        write_lines(build.path / CLASSNAMES_FILE, names)
    logging.info("wrote %d samples in %d shard(s) to %s", len(items), len(writer.sizes), out)
    return writer.sizes


def main(argv=None) -> int:
    parser = builder_parser("open_clip_po.data.pairs", __doc__)
    parser.add_argument("--images", required=True, help="image folder: DIR/<class>/<image>")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--template", default="a photo of a {}.", help="caption template, {} = class name")
    parser.add_argument("--classnames", default=None,
                        help="text file, one readable class name per line in sorted-folder order "
                             "(default: folder names with _ as space)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the shorter side and centre-crop to a square (default: keep size)")
    parser.add_argument("--prefix", default="pairs", help="shard name prefix (default pairs)")
    add_writer_args(parser)
    args = parser.parse_args(argv)
    return run_builder(lambda: build_pairs(
        args.images, args.out, template=args.template, classnames=args.classnames, image_size=args.image_size,
        prefix=args.prefix, **writer_kwargs(args)))


if __name__ == "__main__":
    raise SystemExit(main())
