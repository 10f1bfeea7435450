"""Typographic-attack preference shards, and attacked evaluation folders.

    python -m open_clip_po.data.typographic --images DIR --out OUT [--per-image 1] [--image-size 224]
        [--template "a photo of a {}."] [--classnames FILE] [--fonts FONT ...] [--seed 0]
        [--eval-out DIR [--eval-images DIR]] [--max-count N] [--workers N]

For every image of class ``t`` in ``DIR/<class>/`` (resized and centre-cropped to ``--image-size``):
``OUT/reg-*.tar`` gets the clean image with ``template(t)`` (D_reg); ``OUT/pref-*.tar`` gets ``--per-image``
attacked copies, each with the name of a wrong class ``w`` written on it: x = attacked image,
y_w = ``template(t)``, y_l = ``template(w)``; the json records ``label``, ``written``, ``source`` and the attack
parameters. Also ``OUT/sizes.json`` and ``OUT/classnames.txt``.

The attack follows Defense-Prefix: the written class is drawn uniformly among the wrong ones; font size 20-40 px
at 224 px (scaled with the image), shrunk until the text fits; fill and stroke colours differ, drawn from
white/blue/green/red/magenta/cyan/yellow/black; stroke width 1 (at 224 px); uniform random position; names of
two or more words go on two lines; no background box. Fonts: DejaVu (``/usr/share/fonts/truetype/dejavu``),
else Pillow's built-in scalable font.

``--eval-out DIR`` writes an attacked copy of ``--eval-images`` (default ``--images``) with the same class layout,
files named ``<stem>_true<T>_written<W>.png``, and ``DIR/attacks.jsonl`` with every file's parameters.
Every random choice comes from ``random.Random`` seeded by (seed, source path), so output does not depend on
``--workers``; the same seed gives byte-identical shards.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path, remove_stale_temp_files
from ._build import (add_writer_args, builder_parser, format_caption, ordered_map, run_builder, write_lines,
                     writer_kwargs)
from .classnames import CLASSNAMES_FILE, classnames_for_folders
from .image_files import scan_class_folders
from .publish import StagedBuild
from .shards import META, TXT, YL, YW, ShardWriter, encode_image, fit_square, load_image

COLORS = {
    "white": (255, 255, 255), "blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "yellow": (255, 255, 0), "black": (0, 0, 0),
}
DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
_DEJAVU_FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
                 "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed-Bold.ttf")
PIL_DEFAULT_FONT = "pil-default"  # Pillow's built-in scalable font (needs Pillow >= 10.1 with FreeType)
SIZE_RANGE_224 = (20, 40)  # font size range in px on a 224 px image (Defense-Prefix)
REFERENCE_SIZE = 224


@functools.lru_cache(maxsize=1)
def _available_fonts() -> tuple[str, ...]:
    found = tuple(str(DEJAVU_DIR / f) for f in _DEJAVU_FACES if (DEJAVU_DIR / f).is_file())
    return found or (PIL_DEFAULT_FONT,)


def default_fonts() -> list[str]:
    """DejaVu faces present on this machine, else Pillow's built-in font."""
    return list(_available_fonts())


@functools.lru_cache(maxsize=1024)
def _font(path: str, size: int):
    if path == PIL_DEFAULT_FONT:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size)


def pick_written_class(true_index: int, num_classes: int, rng: random.Random) -> int:
    """A wrong class, uniformly: redraw while it equals the true one."""
    if num_classes < 2:
        raise ValueError(f"a typographic attack needs at least 2 classes, got {num_classes}")
    if not 0 <= true_index < num_classes:
        raise ValueError(f"true class {true_index} outside 0..{num_classes - 1}")
    while True:
        written = rng.randrange(num_classes)
        if written != true_index:
            return written


def _two_lines(text: str) -> str:
    words = text.split()
    if len(words) < 2:
        return text
    cut = math.ceil(len(words) / 2)
    return " ".join(words[:cut]) + "\n" + " ".join(words[cut:])


def render_attack(image: Image.Image, text: str, rng: random.Random, fonts=None,
                  size_range: tuple[int, int] = SIZE_RANGE_224, stroke_width: int = 1
                  ) -> tuple[Image.Image, dict]:
    """Write ``text`` on a copy of ``image``; return it and the parameters used.

    ``size_range`` and ``stroke_width`` are given for a 224 px image and scaled with the shorter side.
    The params dict holds ``text`` (as drawn), ``font``, ``size``, ``fill``, ``stroke``, ``stroke_width``,
    ``xy`` (the draw origin) and ``bbox`` (left, top, right, bottom; always inside the image).
    """
    fonts = list(fonts) if fonts else default_fonts()
    image = image.convert("RGB")  # convert() copies, the input stays untouched
    width, height = image.size
    scale = min(width, height) / REFERENCE_SIZE
    drawn = _two_lines(text)
    font_path = rng.choice(fonts)
    lo = max(1, round(size_range[0] * scale))
    hi = max(lo, round(size_range[1] * scale))
    size = rng.randint(lo, hi)
    fill, stroke = rng.sample(sorted(COLORS), 2)  # two distinct colours: fill != stroke
    sw = max(1, round(stroke_width * scale)) if stroke_width > 0 else 0
    draw = ImageDraw.Draw(image)
    spacing = max(1, round(4 * scale))

    def bbox_at(sz, xy=(0, 0)):
        return draw.multiline_textbbox(xy, drawn, font=_font(font_path, sz), stroke_width=sw, spacing=spacing)

    left, top, right, bottom = bbox_at(size)
    while (right - left > width or bottom - top > height) and size > 1:  # shrink until it fits
        size -= 1
        left, top, right, bottom = bbox_at(size)
    if right - left > width or bottom - top > height:
        raise ValueError(f"cannot fit {text!r} into a {width}x{height} image")
    x0 = rng.randint(0, width - (right - left))
    y0 = rng.randint(0, height - (bottom - top))
    xy = (x0 - left, y0 - top)
    draw.multiline_text(xy, drawn, font=_font(font_path, size), fill=COLORS[fill], stroke_width=sw,
                        stroke_fill=COLORS[stroke], spacing=spacing)
    bbox = [x0, y0, x0 + right - left, y0 + bottom - top]  # the bbox at (0, 0), moved by xy
    params = {"text": drawn, "font": os.path.basename(font_path), "size": size, "fill": fill, "stroke": stroke,
              "stroke_width": sw, "xy": list(xy), "bbox": bbox}
    return image, params


# -- the builder
def _sample_rng(kind: str, seed: int, source: str, copy: int = 0) -> random.Random:
    # Seeded by the source path, not the position in the work queue: results do not depend on --workers.
    return random.Random(f"{kind}:{seed}:{source}:{copy}")


def _attack_one(item, root, names, image_size, per_image, fonts, size_range, image_format, quality, seed):
    path, label = item
    source = Path(path).relative_to(root).as_posix()
    clean = fit_square(load_image(path, image_size), image_size)
    attacks = []
    for copy in range(per_image):
        rng = _sample_rng("typographic", seed, source, copy)
        written = pick_written_class(label, len(names), rng)
        attacked, params = render_attack(clean, names[written], rng, fonts=fonts, size_range=size_range)
        attacks.append((encode_image(attacked, image_format, quality), written, params))
    return source, label, encode_image(clean, image_format, quality), attacks


def _attack_eval(item, root, out, names, image_size, fonts, size_range, seed):
    path, label = item
    source = Path(path).relative_to(root).as_posix()
    rng = _sample_rng("typographic-eval", seed, source)
    written = pick_written_class(label, len(names), rng)
    attacked, params = render_attack(fit_square(load_image(path, image_size), image_size), names[written], rng,
                                     fonts=fonts, size_range=size_range)
    rel = Path(source)
    target = Path(out) / rel.parent / f"{rel.stem}_true{label}_written{written}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        attacked.save(tmp, format="PNG")
    return {"file": target.relative_to(out).as_posix(), "source": source, "label": label, "written": written,
            "attack": params}


def _check_names(names):
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names must be distinct (y_w would equal y_l): {dupes}")
    if len(names) < 2:
        raise ValueError("a typographic attack needs at least 2 classes")


def build_typographic(images, out, per_image=1, image_size=224, template="a photo of a {}.", classnames=None,
                      fonts=None, size_range=SIZE_RANGE_224, seed=0, image_format="jpg", quality=95,
                      max_count=10_000, max_size=3 << 30, workers=0, quiet=False, eval_out=None,
                      eval_images=None) -> dict[str, int]:
    """Write pref/reg shards (and optionally an attacked eval folder); return ``{shard name: count}``."""
    if per_image < 1:
        raise ValueError("--per-image must be >= 1")
    fonts = list(fonts) if fonts else default_fonts()
    for font in fonts:
        if font != PIL_DEFAULT_FONT and not Path(font).is_file():
            raise ValueError(f"font file {font} does not exist")
    folders, items = scan_class_folders(images, empty_class="warn")
    names = classnames_for_folders(classnames, folders)
    _check_names(names)
    random.Random(seed).shuffle(items)
    work = partial(_attack_one, root=Path(images), names=names, image_size=image_size, per_image=per_image,
                   fonts=tuple(fonts), size_range=tuple(size_range), image_format=image_format, quality=quality,
                   seed=seed)
    wkw = dict(max_count=max_count, max_size=max_size)
    with StagedBuild(out) as build:
        with ShardWriter(build, "pref", **wkw) as pref, ShardWriter(build, "reg", **wkw) as reg:
            for index, (source, label, clean, attacks) in enumerate(
                    ordered_map(work, items, workers=workers, desc=f"typographic → {out}", quiet=quiet)):
                y_w = format_caption(template, classname=names[label]).encode("utf-8")
                reg.write(f"{index:08d}", {image_format: clean, TXT: y_w, META: _json(label=label, source=source)})
                for copy, (data, written, params) in enumerate(attacks):
                    y_l = format_caption(template, classname=names[written]).encode("utf-8")
                    pref.write(f"{index:08d}_{copy}", {
                        image_format: data, YW: y_w, YL: y_l, TXT: y_w,
                        META: _json(label=label, written=written, source=source, attack=params)})
        write_lines(build.path / CLASSNAMES_FILE, names)
    sizes = {**pref.sizes, **reg.sizes}
    logging.info("wrote %d preference and %d clean samples to %s", sum(pref.sizes.values()),
                 sum(reg.sizes.values()), out)
    if eval_out is not None:
        build_eval_folder(eval_images or images, eval_out, names, image_size=image_size, fonts=fonts,
                          size_range=size_range, seed=seed, workers=workers, quiet=quiet)
    return sizes


def build_eval_folder(images, out, names, image_size=224, fonts=None, size_range=SIZE_RANGE_224, seed=0,
                      workers=0, quiet=False) -> list[dict]:
    """An attacked copy of an image folder (same class layout); returns the ``attacks.jsonl`` records."""
    folders, items = scan_class_folders(images, empty_class="warn")
    if len(folders) != len(names):
        raise ValueError(f"{images} has {len(folders)} classes, the training folder {len(names)}")
    Path(out).mkdir(parents=True, exist_ok=True)
    for folder in [Path(out), *(Path(out) / f for f in folders)]:
        remove_stale_temp_files(folder)  # of an earlier, killed run (each file is written atomically)
    work = partial(_attack_eval, root=Path(images), out=Path(out), names=names, image_size=image_size,
                   fonts=tuple(fonts or default_fonts()), size_range=tuple(size_range), seed=seed)
    records = list(ordered_map(work, items, workers=workers, desc=f"eval attacks → {out}", quiet=quiet))
    write_lines(Path(out) / "attacks.jsonl", (json.dumps(r, sort_keys=True) for r in records))
    write_lines(Path(out) / CLASSNAMES_FILE, names)
    return records


def _json(**fields) -> bytes:
    return json.dumps(fields, sort_keys=True).encode("utf-8")


def main(argv=None) -> int:
    parser = builder_parser("open_clip_po.data.typographic", __doc__)
    parser.add_argument("--images", required=True, help="image folder: DIR/<class>/<image>")
    parser.add_argument("--out", required=True, help="output folder for pref-*.tar, reg-*.tar, sizes.json")
    parser.add_argument("--per-image", type=int, default=1, help="attacked copies per image (default 1)")
    parser.add_argument("--image-size", type=int, default=224, help="square side in px (default 224)")
    parser.add_argument("--template", default="a photo of a {}.", help="caption template, {} = class name")
    parser.add_argument("--classnames", default=None,
                        help="text file, one readable class name per line in sorted-folder order "
                             "(default: folder names with _ as space)")
    parser.add_argument("--fonts", nargs="+", default=None,
                        help=f"font files (default: DejaVu faces, else {PIL_DEFAULT_FONT!r})")
    parser.add_argument("--font-size", nargs=2, type=int, default=list(SIZE_RANGE_224), metavar=("MIN", "MAX"),
                        help="font size range in px at 224 px, scaled with the image (default 20 40)")
    parser.add_argument("--eval-out", default=None, help="also write an attacked copy of --eval-images here")
    parser.add_argument("--eval-images", default=None, help="folder to attack for --eval-out (default --images)")
    add_writer_args(parser)
    args = parser.parse_args(argv)
    return run_builder(lambda: build_typographic(
        args.images, args.out, per_image=args.per_image, image_size=args.image_size, template=args.template,
        classnames=args.classnames, fonts=args.fonts, size_range=tuple(args.font_size), eval_out=args.eval_out,
        eval_images=args.eval_images, **writer_kwargs(args)))


if __name__ == "__main__":
    raise SystemExit(main())
