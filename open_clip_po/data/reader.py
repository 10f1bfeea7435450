"""The training reader: triplet shards (b_pref) and, optionally, clean D_reg shards (b_reg) in one batch.

``get_po_data(args, preprocess_fns, epoch, tokenizer)`` follows ``open_clip_train.data.get_wds_dataset``:
brace patterns and ``::`` for several sources, ``--train-num-samples`` or ``sizes.json``,
``--dataset-resampled`` with ``--train-data-upsampling-factors``, shards split by node (``args.rank``/
``args.world_size``) and by DataLoader worker, shuffling seeded by ``--seed`` and the shared epoch, and the
same ``num_samples``/``num_batches`` rounding. It reuses open_clip's ``ResampledShards2``, ``detshuffle2``,
``SharedEpoch``, ``DataInfo`` and ``expand_urls``.

It reads tar members itself instead of through ``tarfile_to_samples_nothrow``: webdataset >= 0.2.96 yields an
end-of-shard ``{}`` that breaks open_clip's grouping (KeyError 'fname'); reading per shard avoids the marker
on every webdataset version, keeps samples from mixing across shards, and lets a broken shard be counted once.

Each batch is a dict: ``images`` [B,3,H,W], ``chosen``/``rejected`` [B,L] tokens of y_w/y_l, with D_reg also
``reg_images`` [B_reg,3,H,W] and ``reg_texts`` [B_reg,L], and ``skipped`` (kind → count of bad samples since the
worker's previous batch; see ``open_clip_po.data.skips``). The D_reg stream never runs out: it is cycled
(or resampled with ``--dataset-resampled``) for as long as the preference stream lasts (Algorithm 1).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import tarfile
import zlib
from contextlib import nullcontext
from functools import partial

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import base_plus_ext, url_opener

from open_clip_train.data import DataInfo, ResampledShards2, SharedEpoch, detshuffle2, expand_urls

from .shards import IMAGE_EXTS, SIZES_FILE, TXT, YL, YW
from .skips import SkipCounter

# open_clip's buffer sizes (open_clip_train.data._SHARD_SHUFFLE_SIZE ...)
SHARD_SHUFFLE_SIZE, SHARD_SHUFFLE_INITIAL = 2000, 500
SAMPLE_SHUFFLE_SIZE, SAMPLE_SHUFFLE_INITIAL = 5000, 1000


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on the TarFile whether the archive ended with its end-of-archive block.

    In stream mode ``tarfile`` treats a file cut exactly at a member boundary as a normal end; a shard without
    the zero block at the end was truncated.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.po_clean_end = True
            raise


def iter_tar_members(sources, counter: SkipCounter, prefix: str = ""):
    """``{"url", "stream"}`` dicts → ``(url, member name, bytes)``; a broken shard is one ``truncated_shard``."""
    for source in sources:
        url, stream = source["url"], source["stream"]
        current = None
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
            for info in tar:
                if not info.isreg():
                    continue
                current = info.name
                data = tar.extractfile(info).read()
                yield url, info.name, data
                tar.members = []  # stream mode keeps every TarInfo otherwise
            if not getattr(tar, "po_clean_end", False):
                raise tarfile.ReadError("no end-of-archive block")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exn:
            key = base_plus_ext(current)[0] if current else None
            where = f"while reading member {current}" if current else "before the first member"
            counter.skip(prefix + "truncated_shard", url, key, f"{type(exn).__name__}: {exn} ({where})")
        finally:
            stream.close()


def group_members(members):
    """Members → samples ``{"__key__", "__url__", ext: bytes}``; a sample never spans two shards."""
    current = None
    for url, name, data in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue  # a member without an extension belongs to no sample (e.g. a stray README)
        ext = ext.lower()
        if current is None or key != current["__key__"] or url != current["__url__"] or ext in current:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        current[ext] = data
    if current is not None:
        yield current


def _open_failed(counter: SkipCounter, prefix: str, exn: Exception) -> bool:
    # url_opener appends the url to the exception's args
    url, reason = (exn.args[-1], exn.args[:-1]) if exn.args else (None, ())
    detail = getattr(exn, "strerror", None) or " ".join(str(a) for a in reason) or repr(exn)
    counter.skip(prefix + "unreadable_shard", url, None, f"{type(exn).__name__}: {detail}")
    return True


def _decode_image(sample, counter, prefix):
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        counter.skip(prefix + "missing_image", sample["__url__"], sample["__key__"],
                     f"members: {sorted(k for k in sample if not k.startswith('__'))}")
        return None
    return ext


def _load_rgb(sample, ext, counter, prefix):
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            return image.convert("RGB")  # convert() forces the full decode
    except Exception as exn:  # Pillow raises many types for bad bytes
        counter.skip(prefix + "corrupt_image", sample["__url__"], sample["__key__"],
                     f"{ext}: {type(exn).__name__}: {exn}")
        return None


def _text(sample, member, counter, prefix):
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
    ext = _decode_image(sample, counter, "")
    if ext is None:
        return None
    for member, kind in ((YW, "missing_yw"), (YL, "missing_yl")):
        if member not in sample:
            counter.skip(kind, url, key, f"no {key}.{member}")
            return None
    y_w = _text(sample, YW, counter, "")
    y_l = _text(sample, YL, counter, "") if y_w is not None else None
    if y_w is None or y_l is None:
        return None
    chosen, rejected = tokenize(y_w), tokenize(y_l)
    if torch.equal(chosen, rejected):
        counter.skip("identical_captions", url, key, f"y_w and y_l tokenize the same: {y_w!r} / {y_l!r}")
        return None
    image = _load_rgb(sample, ext, counter, "")
    if image is None:
        return None
    return preprocess(image), chosen, rejected


def decode_pair(sample, preprocess, tokenize, counter: SkipCounter):
    """A raw D_reg sample (image + ``txt``) → ``(image tensor, tokens)``, or None (counted)."""
    ext = _decode_image(sample, counter, "reg_")
    if ext is None:
        return None
    if TXT not in sample:
        counter.skip("reg_missing_caption", sample["__url__"], sample["__key__"], f"no {sample['__key__']}.txt")
        return None
    text = _text(sample, TXT, counter, "reg_")
    if text is None:
        return None
    image = _load_rgb(sample, ext, counter, "reg_")
    if image is None:
        return None
    return preprocess(image), tokenize(text)


def _batches(samples, size):
    """Full batches of stacked tensors (like open_clip's training loader, an incomplete last batch is dropped)."""
    buf = []
    for sample in samples:
        buf.append(sample)
        if len(buf) == size:
            yield tuple(torch.stack(column) for column in zip(*buf))
            buf = []


class _WorkerSeed:
    """Seed for ``ResampledShards2``: distinct per (seed, rank, worker); the epoch is added by the caller."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return ((self.seed * 65_537 + self.rank) * 4_099 + worker) * 1_000_003


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Tokenize:
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


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from whole numbers (stable across processes and runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class PreferenceDataset(IterableDataset):
    """One reading process's stream of PO batches; see the module docstring."""

    def __init__(self, urls, weights, reg_urls, *, resampled, batch_size, reg_batch_size, num_worker_batches,
                 preprocess, tokenizer, seed, rank, world_size, shared_epoch, strict=False):
        super().__init__()
        self.urls, self.reg_urls = list(urls), list(reg_urls or [])
        self.resampled = resampled
        self.batch_size, self.reg_batch_size = batch_size, reg_batch_size
        self.num_worker_batches = num_worker_batches
        self.preprocess, self.tokenize = preprocess, _Tokenize(tokenizer)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shared_epoch = shared_epoch
        self.counter = SkipCounter(strict)  # one per process: workers get their own copy
        self.resampler = (ResampledShards2(self.urls, weights=weights, deterministic=True,
                                           worker_seed=_WorkerSeed(seed, rank), epoch=shared_epoch)
                          if resampled else None)

    # -- shards
    def _pref_shards(self, worker, num_workers):
        if self.resampled:
            return iter(self.resampler)
        shuffled = detshuffle2(bufsize=SHARD_SHUFFLE_SIZE, initial=SHARD_SHUFFLE_INITIAL, seed=self.seed,
                               epoch=self.shared_epoch).run(iter([{"url": u} for u in self.urls]))
        by_node = itertools.islice(shuffled, self.rank, None, self.world_size)
        return itertools.islice(by_node, worker, None, num_workers)

    def _reg_shards(self, epoch, worker, num_workers, rng, cycle):
        n = len(self.reg_urls)
        if self.resampled:
            return [{"url": u} for u in rng.choices(self.reg_urls, k=n)]
        order = list(self.reg_urls)
        random.Random(f"reg-order:{self.seed}:{epoch}:{cycle}").shuffle(order)  # same order on every worker
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        # Fewer shards than readers: every reader cycles all shards, starting at a different one.
        mine = order[slot::slots] if n >= slots else order[slot % n:] + order[:slot % n]
        return [{"url": u} for u in mine]

    # -- samples
    def _samples(self, shards, prefix, rng, decode):
        members = iter_tar_members(url_opener(shards, handler=partial(_open_failed, self.counter, prefix)),
                                   self.counter, prefix)
        raw = _shuffle(group_members(members), SAMPLE_SHUFFLE_SIZE, SAMPLE_SHUFFLE_INITIAL, rng=rng)
        for sample in raw:
            decoded = decode(sample, self.preprocess, self.tokenize, self.counter)
            if decoded is not None:
                yield decoded

    def _reg_samples(self, epoch, worker, num_workers):
        for cycle in itertools.count():  # endless: one b_reg per b_pref, however long the pref stream lasts
            rng = random.Random(f"reg:{self.seed}:{epoch}:{self.rank}:{worker}:{cycle}")
            good = 0
            for sample in self._samples(self._reg_shards(epoch, worker, num_workers, rng, cycle), "reg_", rng,
                                        decode_pair):
                good += 1
                yield sample
            if good == 0:
                raise RuntimeError(f"--po-reg-data: a full pass over {len(self.reg_urls)} shard(s) gave no usable "
                                   f"sample (bad-sample counts so far: {dict(self.counter.pending)})")

    def __iter__(self):
        epoch = self.shared_epoch.get_value()
        worker, num_workers = _worker()
        if get_worker_info() is not None:
            # Persistent workers carry their RNG from epoch to epoch; seeding it per epoch makes the random
            # augmentations of epoch N the same whatever came before, so a resumed run repeats them exactly.
            torch.manual_seed(hash_seed(self.seed, epoch, self.rank, worker))
        rng = random.Random(f"pref:{self.seed}:{epoch}:{self.rank}:{worker}")
        pref = _batches(self._samples(self._pref_shards(worker, num_workers), "", rng, decode_triplet),
                        self.batch_size)
        reg = (_batches(self._reg_samples(epoch, worker, num_workers), self.reg_batch_size)
               if self.reg_urls else None)
        # Look one batch ahead so that bad samples met after the last full batch still travel with a batch.
        produced, pending = 0, next(pref, None)
        while pending is not None:
            produced += 1
            following = next(pref, None) if produced < self.num_worker_batches else None
            images, chosen, rejected = pending
            batch = {"images": images, "chosen": chosen, "rejected": rejected}
            if reg is not None:
                batch["reg_images"], batch["reg_texts"] = next(reg)
            batch["skipped"] = self.counter.drain()
            yield batch
            pending = following


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


def _rank_world(args) -> tuple[int, int]:
    rank, world = getattr(args, "rank", None), getattr(args, "world_size", None)
    if rank is None or world is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    return int(rank), int(world)


def get_po_data(args, preprocess_fns, epoch: int = 0, tokenizer=None) -> dict:
    """``{"train": DataInfo}`` for PO training; see the module docstring for the batch layout."""
    train_data = getattr(args, "train_data", None)
    if not train_data:
        raise ValueError("--train-data (triplet shards) is required for preference optimisation")
    if tokenizer is None:
        from open_clip import tokenize as tokenizer  # CLIP's BPE tokenizer, context 77
    preprocess_train = preprocess_fns[0]
    resampled = bool(getattr(args, "dataset_resampled", False))
    factors = getattr(args, "train_data_upsampling_factors", None)
    if factors is not None and not resampled:
        raise ValueError("--train-data-upsampling-factors needs --dataset-resampled (as in open_clip)")
    urls, weights = expand_urls(train_data, factors)
    rank, world_size = _rank_world(args)
    workers = int(getattr(args, "workers", 0) or 0)
    batch_size = int(getattr(args, "batch_size"))
    reg_batch_size = getattr(args, "po_reg_batch_size", None) or batch_size
    seed = int(getattr(args, "seed", 0) or 0)

    num_samples = getattr(args, "train_num_samples", None) or dataset_size(urls)
    if not num_samples:
        raise ValueError("the number of training samples is unknown: give --train-num-samples or put a "
                         f"{SIZES_FILE} beside the shards")
    if not resampled and len(urls) < max(1, workers) * world_size:
        raise ValueError(f"{len(urls)} shard(s) for {max(1, workers)} worker(s) x {world_size} rank(s): every "
                         "reader needs a shard (use more shards, fewer workers, or --dataset-resampled)")
    # open_clip's rounding: the same number of full batches on every worker of every rank.
    global_batch_size = batch_size * world_size
    num_batches = math.ceil(num_samples / global_batch_size)
    num_worker_batches = math.ceil(num_batches / max(1, workers))
    num_batches = num_worker_batches * max(1, workers)
    num_samples = num_batches * global_batch_size

    reg_urls = None
    reg_data = getattr(args, "po_reg_data", None)
    if reg_data:
        reg_urls, _ = expand_urls(reg_data)
        reg_size = getattr(args, "po_reg_num_samples", None) or dataset_size(reg_urls)
        logging.info("D_reg: %d shard(s), %s samples, %d per batch, %s", len(reg_urls),
                     reg_size if reg_size else "unknown", reg_batch_size,
                     "resampled" if resampled else "cycled")

    shared_epoch = SharedEpoch(epoch=epoch)
    dataset = PreferenceDataset(
        urls, weights, reg_urls, resampled=resampled, batch_size=batch_size, reg_batch_size=reg_batch_size,
        num_worker_batches=num_worker_batches, preprocess=preprocess_train, tokenizer=tokenizer, seed=seed,
        rank=rank, world_size=world_size, shared_epoch=shared_epoch,
        strict=bool(getattr(args, "po_strict_data", False)))
    dataloader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                            persistent_workers=workers > 0)
    dataloader.num_batches = num_batches
    dataloader.num_samples = num_samples
    return {"train": DataInfo(dataloader=dataloader, shared_epoch=shared_epoch)}
