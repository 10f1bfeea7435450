"""Decoding raw samples (``{"__key__", "__url__", ext: bytes}``) into tensors; a bad sample is counted, not raised.

Checks run cheap ones first (members present, text decodes, captions differ) and the image decode last, so a
sample is counted once, under the first thing wrong with it. Kinds: ``open_clip_po.data.skips``.
"""
from __future__ import annotations

import io

import torch
from PIL import Image

from .image_files import IMAGE_EXTENSIONS
from .shards import TXT, YL, YW
from .skips import SkipCounter


def find_image_member(sample, counter: SkipCounter, prefix: str = "") -> str | None:
    """The extension of the sample's image member (the first of ``IMAGE_EXTENSIONS`` present), or None (counted)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        counter.skip(prefix + "missing_image", sample["__url__"], sample["__key__"],
                     f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    return ext


def decode_rgb(sample, ext: str, counter: SkipCounter, prefix: str = "") -> Image.Image | None:
    """The image member as a fully decoded RGB image, or None (counted as ``corrupt_image``)."""
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            return image.convert("RGB")  # convert() forces the full decode
    except Exception as exn:  # Pillow raises many types for bad bytes
        counter.skip(prefix + "corrupt_image", sample["__url__"], sample["__key__"],
                     f"{ext}: {type(exn).__name__}: {exn}")
        return None


def decode_caption(sample, member: str, counter: SkipCounter, prefix: str = "") -> str | None:
    """A UTF-8 caption member, stripped; None (counted) if it does not decode or is empty."""
    try:
        text = sample[member].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        counter.skip(prefix + "undecodable_text", sample["__url__"], sample["__key__"], f"{member}: {exn}")
        return None
    if not text:
        counter.skip(prefix + "empty_caption", sample["__url__"], sample["__key__"], f"{member} is empty")
        return None
    return text


def decode_triplet(sample, preprocess, tokenize, counter: SkipCounter):
    """A raw triplet sample → ``(image tensor, y_w tokens, y_l tokens)``, or None (counted) if it is bad."""
    url, key = sample["__url__"], sample["__key__"]
    ext = find_image_member(sample, counter)
    if ext is None:
        return None
    for member, kind in ((YW, "missing_yw"), (YL, "missing_yl")):
        if member not in sample:
            counter.skip(kind, url, key, f"no {key}.{member}")
            return None
    y_w = decode_caption(sample, YW, counter)
    y_l = decode_caption(sample, YL, counter) if y_w is not None else None
    if y_w is None or y_l is None:
        return None
    chosen, rejected = tokenize(y_w), tokenize(y_l)
    if torch.equal(chosen, rejected):
        counter.skip("identical_captions", url, key, f"y_w and y_l tokenize the same: {y_w!r} / {y_l!r}")
        return None
    image = decode_rgb(sample, ext, counter)
    if image is None:
        return None
    return preprocess(image), chosen, rejected


def decode_pair(sample, preprocess, tokenize, counter: SkipCounter):
    """A raw D_reg sample (image + ``txt``) → ``(image tensor, tokens)``, or None (counted)."""
    ext = find_image_member(sample, counter, "reg_")
    if ext is None:
        return None
    if TXT not in sample:
        counter.skip("reg_missing_caption", sample["__url__"], sample["__key__"], f"no {sample['__key__']}.txt")
        return None
    text = decode_caption(sample, TXT, counter, "reg_")
    if text is None:
        return None
    image = decode_rgb(sample, ext, counter, "reg_")
    if image is None:
        return None
    return preprocess(image), tokenize(text)


class Tokenize:
    """One caption → its tokens, memoised: PO captions repeat a lot (class templates, gender captions)."""

    def __init__(self, tokenizer, cache_size: int = 16_384):
        self.tokenizer, self.cache_size = tokenizer, cache_size
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, text: str) -> torch.Tensor:
        tokens = self._cache.get(text)
        if tokens is None:
            tokens = self.tokenizer([text])[0].clone()  # only ever read (stacked into batches), never modified
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[text] = tokens
        return tokens
