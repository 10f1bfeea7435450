"""The reference-feature cache on disk and in memory.

Layout of a cache folder::

    DIR/manifest.json                 written last: what the features were computed with, one entry per data shard
                                      ({"bytes", "sha256", "kind"}) and the SHA-256 of every cache file
    DIR/shards/<shard file name>.pt   {"keys": [sample key, ...], "image": [N, D], "tokens": [M, L], "text": [M, D],
                                       "source": {"bytes", "sha256"} of the data shard they were computed from}
    DIR/prompts.pt                    {"tokens": [C, L], "text": [C, D]} (only with --po-classnames)

Image features are per sample (they depend on the image and on a deterministic training transform); text
features are per caption (keyed by its token ids), so class prompts, y_w, y_l and D_reg captions share one table.
All tensors are float32 and L2-normalised; files are written atomically and read with ``weights_only=True``.

A run checks the cache's contents, not only its shape (``verify``): every cache file against its digest while it
is read, and every data shard the run reads against the digest of the shard the features came from.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .verify import data_shard_mismatch, file_digest, read_checked

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
PROMPTS_FILE = "prompts.pt"
FORMAT = 2  # 1: no content digests (shards checked by size only); such a cache must be rebuilt


class CacheError(ValueError):
    """A cache that does not fit the run or cannot be read; the message is one line naming the file."""


def existing(urls) -> list[str]:
    """The shards of an expanded pattern that are there (a brace range may name a few that are not)."""
    return [u for u in urls if os.path.isfile(u)]


def deterministic_augmentation(aug_cfg) -> bool:
    """True when open_clip's training transform maps an image to one tensor: a random resized crop whose scale
    is (1, 1) keeps the whole image (on square images at any aspect ratio it can draw; on others it falls back
    to the whole image), and no colour jitter, grey-scale, random erasing or timm pipeline adds randomness."""
    cfg = dict(aug_cfg or {})
    scale = tuple(float(x) for x in cfg.get("scale", (0.9, 1.0)))
    return (scale == (1.0, 1.0) and not cfg.get("use_timm") and not cfg.get("color_jitter_prob")
            and not cfg.get("gray_scale_prob") and not cfg.get("re_prob"))


def run_signature(args, preprocess_train) -> dict:
    """What a cache must have been computed with to serve this run (compared key by key)."""
    pretrained = getattr(args, "po_ref_pretrained", None) or args.pretrained
    digest = file_digest(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained
    return {"model": getattr(args, "po_ref_model", None) or args.model, "pretrained": digest,
            "context_length": getattr(args, "force_context_length", None), "preprocess": repr(preprocess_train),
            "precision": args.precision}


def _load(path: Path, data: bytes | None = None) -> dict:
    """A cache file (from ``data``, its bytes, when they were read already to check them)."""
    try:
        obj = torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, ...
        raise CacheError(f"reference cache file {path} cannot be read ({type(e).__name__}); rebuild the cache") from e
    if not isinstance(obj, dict) or "text" not in obj or "tokens" not in obj:
        raise CacheError(f"reference cache file {path} is not a cache shard; rebuild the cache")
    return obj


@dataclass
class RefCache:
    """The features of one cache folder, ready to join to batches."""
    folder: Path
    logit_scale: float
    image_index: dict          # "shard name/key" -> (shard number, row)
    images: list               # per shard: [N, D]
    text_index: dict           # token bytes -> row of ``texts``
    texts: torch.Tensor        # [M, D]
    manifest: dict = field(default_factory=dict)

    def image_features(self, keys, device) -> torch.Tensor:
        rows = []
        for key in keys:
            where = self.image_index.get(key)
            if where is None:
                raise CacheError(f"sample {key} is not in the reference cache {self.folder} (built from other "
                                 "shards, or before they changed): rebuild it")
            rows.append(self.images[where[0]][where[1]])
        return torch.stack(rows).to(device)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in tokens.cpu().numpy():
            index = self.text_index.get(row.tobytes())
            if index is None:
                raise CacheError(f"a caption of this batch is not in the reference cache {self.folder} (built with "
                                 "other shards, class prompts or tokenizer): rebuild it")
            rows.append(index)
        return self.texts[rows].to(tokens.device)


def _check_manifest(folder: Path, manifest: dict, signature: dict, urls) -> None:
    path = folder / MANIFEST
    if manifest.get("format") == 1:
        raise CacheError(f"{path} was written by an earlier version that kept no content digests, so its features "
                         "cannot be checked against the shards: rebuild it (python -m open_clip_po.ref_cache with "
                         f"--out {folder}; its feature files are computed again)")
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    for key, want in signature.items():
        have = manifest["signature"].get(key)
        if have != want:
            shown = (lambda v: str(v)[:60])
            raise CacheError(f"{path} was computed with {key} = {shown(have)}, this run has {shown(want)}: "
                             "rebuild the cache for this run")
    for url in urls:
        name = os.path.basename(url)
        entry = manifest["shards"].get(name)
        if entry is None:
            raise CacheError(f"{path} has no features for shard {name} (built from other shards): rebuild it")
        if entry["bytes"] != os.path.getsize(url):
            raise CacheError(f"{path}: shard {name} has {os.path.getsize(url)} bytes, the cache was built from one "
                             f"of {entry['bytes']}: rebuild it")


def load_ref_cache(folder: str | os.PathLike, signature: dict, urls, need_prompts: bool = False) -> RefCache:
    """Load and check a cache for a run (``signature`` from :func:`run_signature`, ``urls`` its shards).

    Under torch.distributed every rank calls it: the data shards' digests are checked in shares, then agreed on
    (``verify.data_shard_mismatch``); a mismatch is the same one-line ``CacheError`` on every rank."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path} not found: the cache was not built, or its build did not finish "
                         "(run python -m open_clip_po.ref_cache again; it resumes)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON: {e}") from e
    _check_manifest(folder, manifest, signature, urls)
    mismatch = data_shard_mismatch(path, manifest, urls)
    if mismatch:
        raise CacheError(mismatch)
    image_index, images, text_index, texts = {}, [], {}, []
    names = sorted({os.path.basename(u) for u in urls})
    files = [folder / SHARDS_DIR / f"{n}.pt" for n in names]
    if need_prompts:
        if not (folder / PROMPTS_FILE).is_file():
            raise CacheError(f"{folder / PROMPTS_FILE} not found: build the cache with --po-classnames")
        files.append(folder / PROMPTS_FILE)
    for name, file in zip(names + [None], files):
        data, mismatch = read_checked(folder, file, manifest)
        if mismatch:
            raise CacheError(mismatch)
        shard = _load(file, data)
        if name is not None:
            if len(shard["keys"]) != shard["image"].shape[0]:
                raise CacheError(f"reference cache file {file} is inconsistent (keys vs rows); rebuild the cache")
            for row, key in enumerate(shard["keys"]):
                image_index[f"{name}/{key}"] = (len(images), row)
            images.append(shard["image"])
        for tokens, feature in zip(shard["tokens"].numpy(), shard["text"]):
            if tokens.tobytes() not in text_index:
                text_index[tokens.tobytes()] = len(texts)
                texts.append(feature)
    return RefCache(folder, float(manifest["logit_scale"]), image_index, images, text_index,
                    torch.stack(texts) if texts else torch.zeros(0), manifest)
