"""The training stream: triplet shards (b_pref) and, optionally, clean D_reg shards (b_reg) in one batch.

``PreferenceDataset`` is one reading process's stream (split by rank and DataLoader worker, shuffled as
open_clip's ``get_wds_dataset`` does, with its ``ResampledShards2``, ``detshuffle2`` and ``SharedEpoch``);
``POLoader`` is the DataLoader the trainer iterates. The args → ``DataInfo`` glue is ``open_clip_po.data.loader``.

Each batch is a dict: ``images`` [B,3,H,W], ``chosen``/``rejected`` [B,L] tokens of y_w/y_l, with D_reg also
``reg_images`` [B_reg,3,H,W] and ``reg_texts`` [B_reg,L], ``keys`` (and ``reg_keys``): each sample's
``<shard file name>/<key>``, and ``skipped`` (kind → count of bad samples since the worker's previous batch; see
``open_clip_po.data.skips``). The D_reg stream never runs out: it is cycled
(or resampled with ``--dataset-resampled``) for as long as the preference stream lasts (Algorithm 1).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections import Counter

import torch
from open_clip_train.data import ResampledShards2, detshuffle2
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from .decode import Tokenize, decode_pair, decode_triplet
from .skips import SkipCounter
from .tar import group_members, iter_tar_members, read_samples

# open_clip's buffer sizes (open_clip_train.data._SHARD_SHUFFLE_SIZE ...)
SHARD_SHUFFLE_SIZE, SHARD_SHUFFLE_INITIAL = 2000, 500
SAMPLE_SHUFFLE_SIZE, SAMPLE_SHUFFLE_INITIAL = 5000, 1000

__all__ = ["PreferenceDataset", "POLoader", "group_members", "iter_tar_members"]  # the tar stages: older home


def sample_key(url: str, key: str) -> str:
    """A sample's name across shards: ``<shard file name>/<key>``."""
    return f"{os.path.basename(url)}/{key}"


def _batches(samples, size):
    """Full batches of stacked tensors (like open_clip's training loader, an incomplete last batch is dropped)."""
    buf = []
    for sample in samples:
        buf.append(sample)
        if len(buf) == size:
            yield tuple(torch.stack(column) if torch.is_tensor(column[0]) else list(column) for column in zip(*buf))
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
        self.preprocess, self.tokenize = preprocess, Tokenize(tokenizer)
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
        raw = _shuffle(read_samples(shards, self.counter, prefix), SAMPLE_SHUFFLE_SIZE, SAMPLE_SHUFFLE_INITIAL,
                       rng=rng)
        for sample in raw:
            decoded = decode(sample, self.preprocess, self.tokenize, self.counter)
            if decoded is not None:  # the sample's key rides along: a reference cache joins features by it
                yield (*decoded, sample_key(sample["__url__"], sample["__key__"]))

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
            images, chosen, rejected, keys = pending
            batch = {"images": images, "chosen": chosen, "rejected": rejected, "keys": keys}
            if reg is not None:
                batch["reg_images"], batch["reg_texts"], batch["reg_keys"] = next(reg)
            batch["skipped"] = self.counter.drain()
            yield batch
            pending = following
        if self.counter.pending:  # no batch left to carry them (e.g. every shard unreadable)
            yield {"skipped": self.counter.drain()}


class POLoader:
    """The DataLoader over ``PreferenceDataset`` that the trainer iterates, with open_clip's ``num_batches`` and
    ``num_samples``.

    A reading process that meets bad samples after its last batch (or yields no batch at all) sends their counts
    in a batch-less ``{"skipped": ...}``: they ride on the next batch, or, when none follows, wait in
    ``drain_skips()`` for the ``SkipLedger`` that watches this loader (``ledger.watch(loader)``).
    """

    def __init__(self, loader, num_batches: int, num_samples: int):
        self.loader, self.num_batches, self.num_samples = loader, num_batches, num_samples
        self._undelivered: Counter = Counter()

    def __iter__(self):
        pending = Counter()
        try:
            for item in self.loader:
                if "images" not in item:
                    pending.update(item["skipped"])
                    continue
                if pending:
                    item["skipped"] = dict(Counter(item["skipped"]) + pending)
                    pending.clear()
                yield item
        finally:
            self._undelivered.update(pending)

    def __len__(self) -> int:
        return self.num_batches

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)  # the rest of the DataLoader's face (dataset, num_workers, ...)

    def drain_skips(self) -> dict[str, int]:
        """Skip counts that no batch carried; cleared by the call."""
        out = dict(self._undelivered)
        self._undelivered.clear()
        return out
