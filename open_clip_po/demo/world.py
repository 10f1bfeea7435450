"""A small synthetic image world in which a CLIP learns both to see objects and to read words.

Each class is a coloured shape (shape × colour) with a short single-word name ("fox", "wolf", ...). A pre-training
image is one of four kinds, as on the web:

- ``object``: the object on a varied background,
- ``labelled``: the object with its class name written on the image,
- ``word``: only the class name written on a background (the text is the only cue, so reading pays off),
- ``sign``: the class name written beside an object of another class, captioned by what is written (a photo of
  a sign: web captions often transcribe the text in a picture, which is where CLIP's habit of reading comes from).

The attack (``attack``) writes a *wrong* class name the same way, in the Defense-Prefix style (wrong class drawn
uniformly, fill and stroke colours from eight colours with fill ≠ stroke, stroke width 1, uniform position, shrunk
until it fits). Glyph sizes are given at 224 px and scaled with the image (``TEXT_SIZE_224``): 44–60 px, i.e.
13–17 px on the demo's 64 px images — large enough for a small network to learn to read in minutes (6 px text it
does not learn at all, ``../shared/design.md`` §6), small enough to leave most of the object visible (the text
covers 14 % of it on average; at 64–84 px it covered 23 %, and a model that ignores the text could not recover
the class of many attacked images, which capped what any defence could show).
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from open_clip_po.data.typographic import render_attack

# Four shapes a small network tells apart at 64 px (squares passed for circles and diamonds for stars), in six
# colours: every class is still defined by both cues.
SHAPES = ("circle", "triangle", "star", "cross")
OBJECT_COLOURS = {  # name -> RGB; distinct hues so colour is learnable from a few pixels
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 215),
}
# Single short words, distinct in length and letters, so a small model can tell them apart when written.
CLASS_WORDS = (
    "cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "yak", "emu", "eel", "ant",
    "frog", "bear", "duck", "lion", "wolf", "crab", "moth", "seal", "goat", "mole", "deer", "swan",
)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
KINDS = ("object", "labelled", "word", "sign")
TEXT_SIZE_224 = (44, 60)  # font sizes in px at 224 px, for pre-training text and attacks alike


@dataclasses.dataclass(frozen=True)
class WorldClass:
    name: str
    shape: str
    colour: str


def world_classes(num_classes: int = 24) -> list[WorldClass]:
    """The first ``num_classes`` classes; class i is shape i % 4 in colour i // 4 (so any prefix mixes shapes)."""
    if not 2 <= num_classes <= len(CLASS_WORDS):
        raise ValueError(f"num_classes must be in [2, {len(CLASS_WORDS)}], got {num_classes}")
    colours = list(OBJECT_COLOURS)
    return [WorldClass(CLASS_WORDS[i], SHAPES[i % len(SHAPES)], colours[(i // len(SHAPES)) % len(colours)])
            for i in range(num_classes)]


@dataclasses.dataclass(frozen=True)
class TextStyle:
    """How words are written (by ``open_clip_po.data.typographic.render_attack``): font sizes in px at 224 px
    (scaled with the image, as the typographic builder's ``--font-size``) and font files."""
    size_range: tuple[int, int] = TEXT_SIZE_224
    fonts: tuple[str, ...] = (str(FONT_DIR / "DejaVuSans-Bold.ttf"),)


TEXT_STYLE = TextStyle()   # pre-training text and attacks are written alike


def write_word(img: Image.Image, word: str, rng: np.random.Generator, style: TextStyle = TEXT_STYLE
               ) -> tuple[Image.Image, dict]:
    """``word`` written on a copy of ``img`` the way the typographic builder writes attacks; returns it and the
    parameters used."""
    fonts = [f for f in style.fonts if Path(f).is_file()] or None  # None: the builder's fallback font
    return render_attack(img, word, random.Random(int(rng.integers(2**63))), fonts=fonts,
                         size_range=style.size_range)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted background: a colour gradient, plus stripes or a checker pattern some of the time, plus noise."""
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    img = c0 + (c1 - c0) * ramp[..., None]
    pattern = rng.integers(3)
    if pattern == 1:  # stripes
        period = rng.uniform(4, 12)
        stripes = (np.sin(2 * math.pi * (xx * np.cos(angle) + yy * np.sin(angle)) * size / period) > 0)
        img = img + rng.uniform(15, 35) * (stripes[..., None] - 0.5)
    elif pattern == 2:  # checker
        cell = int(rng.integers(4, 12))
        checker = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2)
        img = img + rng.uniform(15, 35) * (checker[..., None] - 0.5)
    img = img + rng.normal(0, rng.uniform(2, 10), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def polygon(n, radii):
        pts = []
        for k in range(n * len(radii)):
            a = rot + 2 * math.pi * k / (n * len(radii))
            rr = radii[k % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "triangle":
        return polygon(3, [r * 1.25])
    if shape == "star":
        return polygon(5, [r * 1.25, r * 0.5])
    if shape == "cross":
        w = r * 0.38
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(f"unknown shape {shape!r}")


OBJECT_RADIUS = (0.17, 0.26)  # as a fraction of the image side


def draw_object(img: Image.Image, cls: WorldClass, rng: np.random.Generator,
                radius: tuple[float, float] = OBJECT_RADIUS) -> Image.Image:
    """Draw the class's object (its shape in its colour, jittered) at a random place; returns the image."""
    size = img.size[0]
    r = rng.uniform(*radius) * size
    cx, cy = rng.uniform(r * 1.2, size - r * 1.2, 2)
    colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in OBJECT_COLOURS[cls.colour])
    draw = ImageDraw.Draw(img)
    if cls.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        rot = rng.uniform(-0.3, 0.3) + (-math.pi / 2 if cls.shape in ("triangle", "star") else 0.0)
        draw.polygon(_shape_points(cls.shape, cx, cy, r, rot), fill=colour)
    return img


def render(cls: WorldClass, kind: str, rng: np.random.Generator, size: int = 64,
           style: TextStyle = TEXT_STYLE, radius: tuple[float, float] = OBJECT_RADIUS,
           distractor: WorldClass | None = None) -> Image.Image:
    """One image of ``cls`` of the given kind: ``object``, ``labelled`` (object and its name), ``word`` (the name
    only) or ``sign`` (the name written next to an unrelated ``distractor`` object, as a photo of a sign in a
    street: the caption is about what is written)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "sign" and (distractor is None or distractor == cls):
        raise ValueError("a sign image needs a distractor object of another class")
    img = Image.fromarray(_background(rng, size))
    if kind in ("object", "labelled"):
        draw_object(img, cls, rng, radius)
    elif kind == "sign":
        draw_object(img, distractor, rng, radius)
    if kind != "object":
        img, _ = write_word(img, cls.name, rng, style)
    return img


def attack(img: Image.Image, true_label: int, classes: list[WorldClass], rng: np.random.Generator,
           style: TextStyle = TEXT_STYLE) -> tuple[Image.Image, int]:
    """Write a wrong class name (drawn uniformly among the others) on a copy of ``img``; return it and its label."""
    written = int(rng.integers(len(classes) - 1))
    written += written >= true_label  # uniform over the other classes, never the true one
    out, _ = write_word(img, classes[written].name, rng, style)
    return out, written


CAPTION_TEMPLATES = {
    # every kind shares the class prompt, so the class word is what ties images and captions together
    "object": ("a photo of a {name}.", "a {name}.", "a picture of a {name}.", "a {colour} {shape}, a {name}.",
               "a {name} on a {bg} background.", "a photo of the {name}.", "a small {name}."),
    "labelled": ("a photo of a {name}.", "a {name}.", "a picture of a {name}.", "a {name} with its name on it.",
                 "a photo of a {name} labelled {name}.", "a {colour} {shape}, a {name}.",
                 "a {name} on a {bg} background."),
    "word": ("a photo of a {name}.", "the word {name}.", "a sign that says {name}.", "{name} written on a {bg} wall.",
             "a picture of the word {name}.", "a {name}."),
    "sign": ("a photo of a {name}.", "a sign that says {name}.", "the word {name}.", "a {name} sign.",
             "a picture of a {name}."),
}


def caption(cls: WorldClass, kind: str, rng: np.random.Generator) -> str:
    """A varied caption for a pre-training image (varied so in-batch duplicates are rarer)."""
    templates = CAPTION_TEMPLATES[kind]
    bg = ("plain", "striped", "checked", "coloured", "noisy")[int(rng.integers(5))]
    return templates[int(rng.integers(len(templates)))].format(name=cls.name, colour=cls.colour, shape=cls.shape,
                                                               bg=bg)
