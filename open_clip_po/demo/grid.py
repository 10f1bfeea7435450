"""Example grids with their rows (and columns) named: the demos' ``world_examples.png``."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from open_clip_po.atomic import atomic_path

LABEL_PX = 14


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], side: int, columns: list[str] | None = None,
                  span: int = 1) -> Image.Image:
    """One row per ``(label, images)``, each image scaled to ``side`` px, the label in a margin on the left; with
    ``columns``, a header naming each group of ``span`` images."""
    font = ImageFont.load_default(size=LABEL_PX)  # scalable (Pillow >= 10.1): no font file needed
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 8 + max((measure.textlength(label, font=font) for label, _ in rows), default=0)
    header = 2 * LABEL_PX if columns else 0
    width = max((len(images) for _, images in rows), default=0)
    grid = Image.new("RGB", (int(margin) + side * width, header + side * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = header + r * side
        draw.text((4, top + side // 2), label, fill="black", font=font, anchor="lm")
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((side, side), Image.NEAREST), (int(margin) + c * side, top))
    for c, name in enumerate(columns or ()):
        draw.text((int(margin) + (c + 0.5) * span * side, header // 2), name, fill="black", font=font, anchor="mm")
    return grid


def save_grid(grid: Image.Image, path: Path) -> Path:
    """A 256-colour PNG (small enough to keep in the repository), written atomically."""
    with atomic_path(path) as tmp:
        grid.quantize(256).save(tmp, format="PNG")
    return path
