"""The typographic copy T of an evaluation image, as Defense-Prefix makes it (Azuma & Matsui, 2023).

Defense-Prefix's ``datasets/utils/make_dataset_train.py`` (github.com/azuma164/Defense-Prefix), which the paper
uses for Table 1: the image is resized (bicubic, shorter side 224) and centre-cropped to 224 × 224; a class name
other than the true one is drawn uniformly; then a font, a fill colour and a stroke colour (redrawn until it
differs from the fill) among White, Blue, Green, Red, Magenta, Cyan, Yellow, Black (PIL's colour names, so Green
is (0, 128, 0)); a font size uniform in 20..40 px, decreased by 1 while the text is not narrower and lower than
the image; the top-left corner uniform in [0, W − w) × [0, H − h); a name of 2–3 words goes on two lines as
"first word / the rest", one of more words as "first two words / the rest"; stroke width 1, no background box;
the result is saved as JPEG at quality 100 (we encode it the same way, and evaluate the decoded JPEG).

Where we differ, and why:
- Randomness: Defense-Prefix seeds Python's global generator once (300) and walks the data set in order; we seed
  ``random.Random`` per image by (seed, data set, image index), so T holds the same images on every run whatever
  the number of processes, workers or the batch size. The draws per image come in Defense-Prefix's order.
- Fonts: its three TrueType files (Roman2, Courier, Times) are not redistributable; by default we use the three
  DejaVu faces of the same kinds (Sans, Sans Mono, Serif), else Pillow's built-in font. ``--typographic-fonts``
  takes the original files where you have them.
- Text size: Pillow >= 10 has no ``textsize``; the width and height are the right and bottom of the text's
  ``multiline_textbbox`` drawn at the origin, which is what ``textsize`` measured.

``open_clip_po.data.typographic.render_attack`` (the training attack) shares the colours' names, the 20–40 px
range and the choice of the written class (``pick_written_class``) but writes at integer positions, splits names
into halves and uses RGB green (0, 255, 0); the copy here follows Defense-Prefix instead.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from open_clip_po.data.typographic import DEJAVU_DIR, PIL_DEFAULT_FONT, _font, pick_written_class

DP_COLORS = ("White", "Blue", "Green", "Red", "Magenta", "Cyan", "Yellow", "Black")
DP_SIZE = 224
DP_FONT_SIZES = (20, 40)
DP_JPEG_QUALITY = 100
_DEJAVU_KINDS = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf")


def default_fonts() -> list[str]:
    found = [str(DEJAVU_DIR / name) for name in _DEJAVU_KINDS if (DEJAVU_DIR / name).is_file()]
    return found or [PIL_DEFAULT_FONT]


def two_lines(text: str) -> str:
    """Defense-Prefix's line break: 2–3 words → first / rest; more → first two / rest; one word stays."""
    words = text.split(" ")
    if 2 <= len(words) <= 3:
        return words[0] + "\n" + " ".join(words[1:])
    if len(words) > 3:
        return " ".join(words[:2]) + "\n" + " ".join(words[2:])
    return text


def dp_crop(image: Image.Image) -> Image.Image:
    """Resize (bicubic, shorter side 224) and centre-crop to 224 × 224, as Defense-Prefix does first."""
    image = image.convert("RGB")
    image = TF.resize(image, DP_SIZE, interpolation=InterpolationMode.BICUBIC)
    return TF.center_crop(image, DP_SIZE)


def draw_text(image: Image.Image, text: str, rng: random.Random, font_path: str, fill: str,
              stroke: str) -> tuple[Image.Image, dict]:
    """Write ``text`` on a copy of a 224 × 224 ``image`` with Defense-Prefix's size and position rule."""
    image = image.copy()
    width, height = image.size
    draw = ImageDraw.Draw(image)
    drawn = two_lines(text)
    size = rng.randint(*DP_FONT_SIZES)

    def extent(sz):
        _, _, right, bottom = draw.multiline_textbbox((0, 0), drawn, font=_font(font_path, sz))
        return right, bottom

    w, h = extent(size)
    while (w >= width or h >= height) and size > 1:
        size -= 1
        w, h = extent(size)
    xy = ((width - w) * rng.random(), (height - h) * rng.random())
    draw.text(xy, drawn, font=_font(font_path, size), fill=fill, stroke_fill=stroke, stroke_width=1)
    params = {"text": drawn, "font": Path(font_path).name, "size": size, "fill": fill, "stroke": stroke,
              "xy": [round(xy[0], 3), round(xy[1], 3)]}
    return image, params


class TypographicCopy:
    """T of one image: ``(attacked image, written class, JPEG bytes, parameters)``, the same for the same
    (seed, data set, index) on every run."""

    def __init__(self, classnames, dataset: str, seed: int = 0, fonts=None):
        self.classnames, self.dataset, self.seed = list(classnames), dataset, int(seed)
        self.fonts = list(fonts) if fonts else default_fonts()

    def describe(self) -> dict:
        return {"procedure": "Defense-Prefix (Azuma & Matsui, 2023)", "seed": self.seed, "size": DP_SIZE,
                "font_sizes": list(DP_FONT_SIZES), "fonts": [Path(f).name for f in self.fonts],
                "colors": list(DP_COLORS), "jpeg_quality": DP_JPEG_QUALITY}

    def __call__(self, image: Image.Image, label: int, index: int):
        rng = random.Random(f"defense-prefix:{self.seed}:{self.dataset}:{index}")
        written = pick_written_class(label, len(self.classnames), rng)  # rng.choice's draw, redrawn if true
        font = rng.choice(self.fonts)
        fill = rng.choice(DP_COLORS)
        stroke = rng.choice(DP_COLORS)
        while stroke == fill:
            stroke = rng.choice(DP_COLORS)
        attacked, params = draw_text(dp_crop(image), self.classnames[written], rng, font, fill, stroke)
        buffer = io.BytesIO()
        attacked.save(buffer, format="JPEG", quality=DP_JPEG_QUALITY)
        data = buffer.getvalue()
        with Image.open(io.BytesIO(data)) as decoded:
            return decoded.convert("RGB"), written, data, params
