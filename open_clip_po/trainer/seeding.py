"""Shuffles seeded from ``--seed``, the epoch and the rank/worker, for open_clip's own webdataset pipeline.

open_clip's ``get_wds_dataset`` (``open_clip_train.data``) shuffles shards with ``detshuffle2`` (seeded by
``--seed`` + epoch) but shuffles *samples* with ``wds.shuffle`` without an ``rng``, which webdataset seeds from
the pid and the clock, so two runs with the same ``--seed`` see different batches. With
``--dataset-resampled`` its ``ResampledShards2`` draws shards from the DataLoader worker seed, or, with no
workers, from ``rank * 1000 + worker`` — not from ``--seed``.

``seeded_open_clip_data(get_args)`` returns replacements for two module globals of ``open_clip_train.data``
(``wds`` and ``ResampledShards2``) that make both follow ``--seed``; ``open_clip_po.main`` installs and restores
them, as it does for ``open_clip_train.main``. ``get_args`` is called when a pipeline is built (inside
``get_data``), after ``parse_args`` and ``init_distributed_device`` have set ``seed`` and ``rank``. The
validation pipeline has no shuffle and needs nothing.

The triplet reader (``open_clip_po.data.reader``) seeds its own shuffles the same way (``random.Random`` of
``"stream:seed:epoch:rank:worker"``), and its ``_WorkerSeed`` serves both resamplers.
"""
from __future__ import annotations

import random
import types

import webdataset as wds
from open_clip_train.data import ResampledShards2, SharedEpoch
from torch.utils.data import get_worker_info
from webdataset.filters import _shuffle

from ..data.reader import _WorkerSeed  # the triplet reader's ResampledShards2 seed: one formula for both

# the module globals of open_clip_train.data that seeded_open_clip_data() replaces
SEEDED_DATA_GLOBALS = ("wds", "ResampledShards2")


def _worker() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def stream_rng(stream: str, seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    """The RNG of one reader (rank, DataLoader worker) for one epoch of one stream: a pure function of the five."""
    return random.Random(f"{stream}:{seed}:{epoch}:{rank}:{worker}")


class SeededShuffle(wds.PipelineStage):
    """``wds.shuffle`` with its buffer, drawing from ``stream_rng("samples", seed, epoch, rank, worker)``.

    ``epoch`` is the pipeline's ``SharedEpoch``; ``seeded_pipeline`` hands it over once the pipeline is built.
    """

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int):
        self.bufsize, self.initial, self.seed, self.rank = bufsize, initial, seed, rank
        self.epoch: SharedEpoch | None = None

    def run(self, src):
        if self.epoch is None:
            raise RuntimeError("SeededShuffle has no SharedEpoch: build the pipeline with seeded_pipeline()")
        rng = stream_rng("samples", self.seed, self.epoch.get_value(), self.rank, _worker())
        return _shuffle(src, self.bufsize, self.initial, rng=rng)


def seeded_pipeline(*stages):
    """``wds.DataPipeline`` that gives each ``SeededShuffle`` the epoch counter of the shard stage before it.

    open_clip puts its ``SharedEpoch`` in the shard stage (``detshuffle2`` or ``ResampledShards2``), the one
    that ``DataInfo.set_epoch`` advances.
    """
    epoch = None
    for stage in stages:
        if isinstance(getattr(stage, "epoch", None), SharedEpoch):
            epoch = stage.epoch
        if isinstance(stage, SeededShuffle):
            if epoch is None:
                raise RuntimeError("a sample shuffle without an epoch-counting shard stage before it")
            stage.epoch = epoch
    return wds.DataPipeline(*stages)


def seeded_open_clip_data(get_args) -> dict:
    """Replacements for ``open_clip_train.data``'s ``SEEDED_DATA_GLOBALS``; ``get_args()`` → the run's args."""

    def shuffle(bufsize=1000, initial=100, **_):
        args = get_args()
        return SeededShuffle(bufsize, initial, seed=int(args.seed), rank=int(args.rank))

    def resampled_shards(urls, weights=None, nshards=None, worker_seed=None, deterministic=False, epoch=-1):
        args = get_args()
        kw = {} if nshards is None else {"nshards": nshards}
        return ResampledShards2(urls, weights=weights, worker_seed=_WorkerSeed(int(args.seed), int(args.rank)),
                                deterministic=True, epoch=epoch, **kw)

    proxy = types.ModuleType(wds.__name__)
    proxy.__dict__.update({k: v for k, v in vars(wds).items() if not k.startswith("__")})
    proxy.shuffle, proxy.DataPipeline = shuffle, seeded_pipeline
    return {"wds": proxy, "ResampledShards2": resampled_shards}
