"""``--po-ref-cache-verify N``: recompute N samples' reference features and compare them with the cache's.

The digests (``verify``) prove the cache files are the ones its build wrote; this proves the build wrote this
reference's features: N samples drawn at random (seeded) from the run's shards are read, encoded by the reference
built from ``--pretrained`` (or ``--po-ref-model/--po-ref-pretrained``) exactly as the builder builds it, and
their image and caption features compared with the cached ones. Rank 0 does it; the verdict is agreed on.

The measure is the L2 distance between the two unit vectors (0 = the same, 2 = opposite; another image's
features are typically 0.3 or more away). The features are recomputed in other batches than at build time, and a
training process on an Ampere GPU runs fp32 matmuls in TF32 (open_clip switches it on; the builder does not),
which moves them by rounding only: 1e-7 on CPU here, up to ~1e-3 with TF32, more in fp16/bf16. The tolerance is
set by the precision the reference runs in (``TOLERANCE``), well below what a wrong feature gives. Cost: N
reference forwards plus reading the shards that hold the samples, up to them (about half a shard per sample).
"""
from __future__ import annotations

import logging
import os
import random

import torch

from ..data.decode import decode_pair, decode_triplet
from ..data.skips import SkipCounter
from ..data.tar import read_samples
from ..losses.distributed import world_info
from .build import reference_model
from .verify import agree

# Largest L2 distance between a cached and a recomputed unit feature, by the precision the reference runs in.
TOLERANCE = {"fp32": 1e-2, "fp16": 2e-2, "bf16": 6e-2}


def tolerance(precision: str) -> tuple[str, float]:
    kind = "bf16" if "bf16" in precision or "bfloat16" in precision else \
        "fp16" if precision == "amp" or "fp16" in precision else "fp32"
    return kind, TOLERANCE[kind]


def choose(cache, count: int, seed: int = 0) -> dict[str, list[str]]:
    """``count`` sample keys of the cache drawn at random (seeded), by shard name."""
    keys = sorted(cache.image_index)
    chosen = random.Random(seed).sample(keys, min(count, len(keys)))
    by_shard: dict[str, list[str]] = {}
    for key in chosen:
        shard, _, sample = key.rpartition("/")
        by_shard.setdefault(shard, []).append(sample)
    return by_shard


def _recomputed(url, kind, wanted, encoder, preprocess, tokenize):
    """``(keys, image features, caption tokens)`` of the ``wanted`` samples of one shard, read up to the last."""
    decode = decode_triplet if kind == "pref" else decode_pair
    keys, images, tokens, left = [], [], [], set(wanted)
    for sample in read_samples([url], SkipCounter()):
        if sample["__key__"] in left:
            decoded = decode(sample, preprocess, tokenize, SkipCounter())
            if decoded is not None:
                keys.append(sample["__key__"])
                images.append(decoded[0])
                tokens += list(decoded[1:])
            left.discard(sample["__key__"])
            if not left:
                break
    if not keys:
        return [], None, []
    return keys, encoder.images(torch.stack(images)), tokens


def compare(cache, urls, count, encoder, preprocess, tokenize, precision) -> str:
    """Recompute ``count`` samples and compare; returns the summary line, raises ValueError naming the file."""
    kind, tol = tolerance(precision)
    by_name = {os.path.basename(u): u for u in urls}
    worst, checked = 0.0, 0
    for name, wanted in sorted(choose(cache, count).items()):
        if name not in by_name:
            continue  # a shard of the cache this run does not read
        shard_kind = cache.manifest.get("shards", {}).get(name, {}).get("kind", "pref")
        keys, images, tokens = _recomputed(by_name[name], shard_kind, wanted, encoder, preprocess, tokenize)
        if not keys:
            continue
        file = cache.folder / "shards" / f"{name}.pt"
        cached = cache.image_features([f"{name}/{k}" for k in keys], "cpu")
        distance = (cached - images).norm(dim=-1)
        texts = torch.stack(tokens)
        text_distance = (cache.text_features(texts) - encoder.texts(texts)).norm(dim=-1)
        for what, d, labels in (("image", distance, keys), ("caption", text_distance, None)):
            i = int(d.argmax())
            if d[i] > tol:
                sample = f"sample {name}/{labels[i]}" if labels else "a caption"
                raise ValueError(f"reference cache file {file}: the {what} features of {sample} are "
                                 f"{float(d[i]):.3g} away from the reference's own (tolerance {tol:g} at {kind}; 2 = "
                                 "opposite): the cache does not hold this reference's features; rebuild it")
            worst = max(worst, float(d[i]))
        checked += len(keys)
    return (f"reference cache spot check: {checked} sample(s) recomputed from the reference, largest distance "
            f"{worst:.2g} (tolerance {tol:g} at {kind})")


def spot_check(cache, args, urls, device) -> str | None:
    """Every rank calls it; rank 0 recomputes ``args.po_ref_cache_verify`` samples. The agreed error, or None."""
    error = None
    if world_info()[0] == 0:
        encoder, _, preprocess, tokenizer = reference_model(args, device)
        try:
            logging.info(compare(cache, urls, args.po_ref_cache_verify, encoder, preprocess,
                                 lambda t: tokenizer([t])[0], args.precision))
        except ValueError as e:
            error = str(e)
        del encoder
    return agree(error)
