"""A small synthetic world of people doing activities, for the gender demo.

Each image shows one figure, a man or a woman, doing one activity, on a varied background (the typographic world's
backgrounds). A viewer tells the gender from drawn cues, as in simple pictograms: a man has short hair, a shirt
and trousers (two legs); a woman has long hair and a flared dress. Clothes, skin and hair colours are drawn
independently of gender, so the silhouette is the cue. The activity is shown by an object beside the figure
(a pot on a stove for cooking, a ball for playing football, ...), on the left or the right.

Pre-training captions are "The man is <activity>" / "The woman is <activity>" (optionally, for a share of the
images, "The person is <activity>"). As on the web, activities are unevenly split between genders
(``WOMEN_SHARE``), so a CLIP trained on it reads gender and ties activities to it; the held-out images are balanced,
so the bias measured there is the model's, not the data's. In a share of the pre-training images the activity's
object is out of frame (the caption still names the activity): there gender is the only hint, so the model learns
to take it as evidence of the activity, as web photos whose caption says more than they show teach it.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .world import _background

GENDERS = ("man", "woman")
# activity -> share of women among its pre-training images (a skew as web data has; held-out sets are balanced)
WOMEN_SHARE = {
    "cooking": 0.8,
    "gardening": 0.7,
    "painting": 0.6,
    "reading": 0.45,
    "fishing": 0.25,
    "playing football": 0.2,
}
ACTIVITIES = tuple(WOMEN_SHARE)
CAPTION = "The {gender} is {activity}"     # the gender builder's and evaluator's default template
NEUTRAL = "The person is {activity}"       # their default androgynous caption (D_reg)

SKIN = ((240, 205, 175), (205, 160, 120), (150, 105, 70), (95, 65, 45))
HAIR = ((30, 25, 20), (95, 60, 30), (210, 170, 80), (150, 60, 30))
CLOTHES = ((200, 50, 50), (50, 90, 200), (50, 160, 70), (230, 200, 50), (150, 70, 170), (240, 240, 240),
           (40, 40, 40), (230, 120, 40))


def _jitter(rgb, rng, sd=10):
    return tuple(int(np.clip(c + rng.normal(0, sd), 0, 255)) for c in rgb)


def draw_figure(draw: ImageDraw.ImageDraw, gender: str, cx: float, top: float, h: float, rng: np.random.Generator
                ) -> tuple[float, float]:
    """A standing figure of height ``h`` whose head top is at (cx, top); returns the hand's position."""
    skin, hair = _jitter(SKIN[rng.integers(len(SKIN))], rng), _jitter(HAIR[rng.integers(len(HAIR))], rng)
    cloth_a, cloth_b = (_jitter(CLOTHES[i], rng) for i in rng.choice(len(CLOTHES), 2, replace=False))
    r = 0.11 * h                                   # head radius
    head_cy = top + r
    neck = head_cy + r
    hip = top + 0.58 * h
    foot = top + h
    if gender == "woman":  # long hair behind the head, down to the shoulders
        draw.rectangle([cx - 1.25 * r, head_cy - 0.2 * r, cx + 1.25 * r, head_cy + 2.0 * r], fill=hair)
    draw.ellipse([cx - r, head_cy - r, cx + r, head_cy + r], fill=skin)
    if gender == "man":  # short hair: a cap on the crown
        draw.chord([cx - r, head_cy - r, cx + r, head_cy + r], 180, 360, fill=hair)
    else:
        draw.chord([cx - 1.1 * r, head_cy - 1.15 * r, cx + 1.1 * r, head_cy + 0.6 * r], 180, 360, fill=hair)
    shoulder = 0.16 * h if gender == "man" else 0.11 * h
    arm_w = max(1.0, 0.045 * h)
    if gender == "man":  # shirt, then trousers with two legs
        draw.rectangle([cx - shoulder, neck, cx + shoulder * 0.85, hip], fill=cloth_a)
        leg = 0.055 * h
        draw.rectangle([cx - shoulder * 0.85, hip, cx - shoulder * 0.85 + 2 * leg, foot], fill=cloth_b)
        draw.rectangle([cx + shoulder * 0.85 - 2 * leg, hip, cx + shoulder * 0.85, foot], fill=cloth_b)
    else:  # a flared dress from the shoulders to the knees, then thin legs
        knee = top + 0.82 * h
        draw.polygon([(cx - shoulder, neck), (cx + shoulder, neck), (cx + 0.3 * h, knee), (cx - 0.3 * h, knee)],
                     fill=cloth_a)
        for dx in (-0.08 * h, 0.05 * h):
            draw.rectangle([cx + dx, knee, cx + dx + 0.035 * h, foot], fill=skin)
    # the arm reaching out to the activity's side (always drawn to the right; the image is mirrored for the left)
    hand = (cx + shoulder + 0.2 * h, neck + 0.22 * h)
    draw.line([(cx + shoulder * 0.8, neck + 0.05 * h), hand], fill=skin, width=int(round(arm_w)))
    return hand


def draw_activity(draw: ImageDraw.ImageDraw, activity: str, hand: tuple[float, float], h: float, foot: float,
                  rng: np.random.Generator) -> None:
    """The object that shows the activity, at the figure's hand (or feet)."""
    hx, hy = hand
    s = 0.22 * h                                       # object size
    if activity == "cooking":  # a stove with a pot and flames
        draw.rectangle([hx - 0.1 * s, hy + 0.4 * s, hx + 1.4 * s, foot], fill=_jitter((120, 120, 130), rng))
        draw.polygon([(hx + 0.3 * s, hy + 0.4 * s), (hx + 0.5 * s, hy + 0.05 * s), (hx + 0.7 * s, hy + 0.4 * s)],
                     fill=(250, 140, 20))
        draw.rectangle([hx, hy - 0.7 * s, hx + 1.2 * s, hy + 0.05 * s], fill=_jitter((60, 60, 60), rng))
    elif activity == "gardening":  # a flower with leaves in a pot
        petal = _jitter(((230, 50, 120), (250, 220, 30), (240, 90, 40))[rng.integers(3)], rng)
        px = hx + 0.7 * s
        draw.line([(px, hy - 0.6 * s), (px, foot - 0.6 * s)], fill=(30, 140, 40), width=max(1, int(0.18 * s)))
        draw.ellipse([px - 0.6 * s, hy - 1.1 * s, px + 0.6 * s, hy - 0.1 * s], fill=petal)
        draw.ellipse([px - 0.2 * s, hy - 0.8 * s, px + 0.2 * s, hy - 0.4 * s], fill=(250, 240, 200))
        draw.polygon([(px - 0.5 * s, foot - 0.6 * s), (px + 0.5 * s, foot - 0.6 * s), (px + 0.35 * s, foot),
                      (px - 0.35 * s, foot)], fill=(170, 80, 40))
    elif activity == "painting":  # an easel with a canvas of colour strokes
        draw.line([(hx + 0.3 * s, foot), (hx + 0.8 * s, hy - 1.2 * s), (hx + 1.3 * s, foot)], fill=(120, 80, 40),
                  width=max(1, int(0.12 * s)))
        draw.rectangle([hx + 0.05 * s, hy - 1.1 * s, hx + 1.55 * s, hy + 0.3 * s], fill=(250, 250, 245))
        for k in range(3):
            colour = CLOTHES[rng.integers(len(CLOTHES))]
            y = hy - 0.9 * s + k * 0.4 * s
            draw.line([(hx + 0.25 * s, y), (hx + 1.35 * s, y + 0.2 * s)], fill=colour, width=max(1, int(0.18 * s)))
    elif activity == "reading":  # an open book held up
        draw.polygon([(hx - 0.1 * s, hy - 0.5 * s), (hx + 0.6 * s, hy - 0.3 * s), (hx + 1.3 * s, hy - 0.5 * s),
                      (hx + 1.3 * s, hy + 0.5 * s), (hx + 0.6 * s, hy + 0.7 * s), (hx - 0.1 * s, hy + 0.5 * s)],
                     fill=_jitter((90, 40, 30), rng))
        draw.polygon([(hx, hy - 0.4 * s), (hx + 0.6 * s, hy - 0.2 * s), (hx + 1.2 * s, hy - 0.4 * s),
                      (hx + 1.2 * s, hy + 0.4 * s), (hx + 0.6 * s, hy + 0.6 * s), (hx, hy + 0.4 * s)],
                     fill=(250, 250, 240))
        draw.line([(hx + 0.6 * s, hy - 0.2 * s), (hx + 0.6 * s, hy + 0.6 * s)], fill=(60, 60, 60), width=1)
    elif activity == "fishing":  # a rod over water with a fish on the line
        tip = (hx + 1.6 * s, hy - 1.4 * s)
        draw.line([(hx, hy), tip], fill=(110, 70, 30), width=max(1, int(0.12 * s)))
        draw.line([tip, (tip[0], foot - 0.5 * s)], fill=(20, 20, 20), width=1)
        draw.rectangle([hx + 0.4 * s, foot - 0.3 * s, hx + 2.6 * s, foot + 0.2 * s], fill=(40, 110, 210))
        draw.ellipse([tip[0] - 0.45 * s, foot - 0.75 * s, tip[0] + 0.45 * s, foot - 0.35 * s], fill=(240, 150, 40))
    elif activity == "playing football":  # a black-and-white ball at the feet
        br = 0.55 * s
        bx, by = hx + 0.4 * s, foot - br
        draw.ellipse([bx - br, by - br, bx + br, by + br], fill=(250, 250, 250), outline=(20, 20, 20))
        pts = [(bx + 0.45 * br * math.cos(a), by + 0.45 * br * math.sin(a))
               for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 6)[:-1]]
        draw.polygon(pts, fill=(20, 20, 20))
    else:
        raise ValueError(f"unknown activity {activity!r}; known: {', '.join(ACTIVITIES)}")


def render_person(gender: str, activity: str, rng: np.random.Generator, size: int = 64,
                  show_activity: bool = True) -> Image.Image:
    """One image of a ``gender`` figure doing ``activity``, randomly sized, placed and mirrored; with
    ``show_activity=False`` the activity's object is out of frame (the figure alone, as in web photos whose
    caption names more than they show)."""
    if gender not in GENDERS:
        raise ValueError(f"gender must be one of {GENDERS}, got {gender!r}")
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    h = rng.uniform(0.7, 0.9) * size
    top = rng.uniform(0.02 * size, size - h - 0.02 * size)
    cx = rng.uniform(0.2, 0.33) * size
    hand = draw_figure(draw, gender, cx, top, h, rng)
    if show_activity:
        draw_activity(draw, activity, hand, h, top + h, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def pretrain_caption(gender: str, activity: str, neutral: bool) -> str:
    return (NEUTRAL if neutral else CAPTION).format(gender=gender, activity=activity)


def skewed_labels(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` (gender, activity) pairs: activities uniform, genders by ``WOMEN_SHARE`` (the web's skew)."""
    acts = rng.integers(len(ACTIVITIES), size=n)
    return [("woman" if rng.random() < WOMEN_SHARE[ACTIVITIES[a]] else "man", ACTIVITIES[a]) for a in acts]


def balanced_labels(per_cell: int) -> list[tuple[str, str]]:
    """``per_cell`` images of each (gender, activity): held-out sets where the data has no bias."""
    return [(g, a) for a in ACTIVITIES for g in GENDERS for _ in range(per_cell)]
