"""Shard patterns → shard urls, for training (``--train-data``, ``--po-reg-data``) and evaluation alike.

A pattern is one or more sources joined by ``::`` (open_clip's convention; with ``--dataset-resampled`` each
source may carry an up-sampling factor). A source is a brace pattern (``pref-{000000..000009}.tar``), a
shell-style glob (``'pref-*.tar'``, sorted), a folder (its ``*.tar``, sorted), or a url/``pipe:`` command.

A pattern that matches no file is an error naming it (a typo must not become an empty epoch); single missing
files of a brace pattern are left to the reader, which counts each as an unreadable shard. Shards of a folder
whose build did not finish, or that differ from their build's manifest, are refused
(``open_clip_po.data.publish``).
"""
from __future__ import annotations

import glob
import json
import os
from contextlib import nullcontext

import braceexpand

from .errors import IncompleteBuildError, ShardPatternError
from .publish import LOCK_FILE, MANIFEST_FILE, SIZES_FILE, check_complete


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def is_shard_spec(spec: str) -> bool:
    """Whether ``spec`` names shards (rather than a folder of class folders)."""
    return spec.endswith(".tar") or any(c in spec for c in "{*?") or "::" in spec or (
        os.path.isdir(spec) and bool(glob.glob(os.path.join(spec, "*.tar"))))


def _expand_source(source: str) -> list[str]:
    if os.path.isdir(source):
        return sorted(glob.glob(os.path.join(source, "*.tar")))
    urls = []
    for url in braceexpand.braceexpand(source):
        if _is_local(url) and any(c in url for c in "*?["):
            urls.extend(sorted(glob.glob(url)))
        else:
            urls.append(url)
    return urls


def _no_match(flag: str, spec: str, source: str) -> Exception:
    folder = source if os.path.isdir(source) else os.path.dirname(source) or "."
    if os.path.exists(os.path.join(folder, LOCK_FILE)) and not os.path.exists(os.path.join(folder, MANIFEST_FILE)):
        return IncompleteBuildError(f"{flag} {spec} matches no file: {folder} holds an unfinished build (no "
                                    f"{MANIFEST_FILE}; killed?); run the builder again with --out {folder}")
    return ShardPatternError(f"{flag} {spec} matches no file")


def expand_shards(spec: str, weights: str | None = None, *, flag: str = "--train-data",
                  require_all: bool = False) -> tuple[list[str], list[float] | None]:
    """``(urls, per-url weights or None)``; see the module docstring.

    ``weights``: ``::``-separated factors, one per source. ``require_all``: every local shard must exist
    (evaluation reads everything it is given); otherwise only some file must.
    """
    sources = spec.split("::")
    factors = None
    if weights is not None:
        factors = [float(w) for w in str(weights).split("::")]
        if len(factors) != len(sources):
            raise ShardPatternError(f"{flag} has {len(sources)} source(s) but the up-sampling factors "
                                    f"{weights!r} give {len(factors)}")
    urls, url_weights = [], []
    for i, source in enumerate(sources):
        found = _expand_source(source)
        if not found:
            raise _no_match(flag, spec, source)
        urls.extend(found)
        url_weights.extend([factors[i]] * len(found) if factors else [])
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(urls):
        raise _no_match(flag, spec, sources[0])
    if require_all and missing:
        more = f" ({len(missing)} missing)" if len(missing) > 1 else ""
        raise ShardPatternError(f"{flag} {spec}: shard not found: {missing[0]}{more}")
    check_complete(urls)
    return urls, (url_weights if factors else None)


def dataset_size(urls) -> int | None:
    """Sum of ``sizes.json`` entries (one file per shard folder, so ``::`` sources in several folders work)."""
    cache, total = {}, 0
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in cache:
            path = os.path.join(folder, SIZES_FILE)
            with open(path) if os.path.exists(path) else nullcontext() as f:
                cache[folder] = json.load(f) if f is not None else None
        sizes = cache[folder]
        if sizes is None or os.path.basename(url) not in sizes:
            return None
        total += int(sizes[os.path.basename(url)])
    return total
