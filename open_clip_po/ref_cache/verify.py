"""Proof that a reference cache holds what it claims: SHA-256 digests, checked once per run at start-up.

- Cache files: each is hashed from the bytes that are then loaded (one read), against the digest its build
  recorded in the manifest. An edited file (e.g. features negated in place and saved back) is refused.
- Data shards: every shard the run reads is hashed and compared with the digest of the shard the features were
  computed from. A shard edited after the build with its size kept (two images swapped) is refused. Under
  torch.distributed each rank hashes its share (every world-size-th shard) and the ranks then agree, so the cost
  is the run's shard bytes / ranks read once: at ImageNet-1k scale (~140 GB of shards) and 8 ranks, ~18 GB per
  rank, about 10-40 s per rank where storage delivers 0.5-2 GB/s to each (SHA-256 itself runs at ~0.5-2 GB/s per
  core). A progress bar shows it on rank 0 for large sets.

The functions return the one-line message of the first mismatch (or None); ``store`` raises it as CacheError.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from tqdm import tqdm

from ..losses.distributed import world_info

PROGRESS_MIN_BYTES = 1 << 30  # smaller sets hash in a moment: no bar


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20, progress: Callable[[int], object] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def agree(error: str | None) -> str | None:
    """The first rank's error (by rank) on every rank, or None when no rank has one (a collective)."""
    world = world_info()[1]
    if world == 1:
        return error
    gathered = [None] * world
    dist.all_gather_object(gathered, error)
    return next((e for e in gathered if e), None)


def data_shard_mismatch(manifest_path: Path, manifest: dict, urls) -> str | None:
    """Hash this rank's share of ``urls`` against the manifest's digests; the ranks' first mismatch, agreed on."""
    rank, world = world_info()
    mine = sorted(urls)[rank::world]
    total = sum(os.path.getsize(u) for u in mine)
    error = None
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"checking data shards against {manifest_path}",
              disable=rank != 0 or total < PROGRESS_MIN_BYTES) as bar:
        for url in mine:
            want = manifest["shards"][os.path.basename(url)].get("sha256")
            if file_digest(url, progress=bar.update) != want:
                error = (f"data shard {url} is not the shard the reference cache was computed from (its SHA-256 "
                         f"differs from the one in {manifest_path}; changed after the cache was built?): rebuild "
                         "the cache")
                break
    return agree(error)


def read_checked(folder: Path, file: Path, manifest: dict) -> tuple[bytes, str | None]:
    """The bytes of cache file ``file`` and the message if they do not match the manifest's digest for it."""
    entry = manifest.get("files", {}).get(file.relative_to(folder).as_posix())
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return b"", f"reference cache file {file} not found: rebuild the cache"
    if entry is None:
        return data, f"reference cache file {file} is not listed in {folder / 'manifest.json'}: rebuild the cache"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return data, (f"reference cache file {file} does not match the SHA-256 that {folder / 'manifest.json'} "
                      "records for it (changed after the build): rebuild the cache")
    return data, None
