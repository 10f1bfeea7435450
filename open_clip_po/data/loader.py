"""``get_po_data(args, preprocess_fns, epoch, tokenizer)`` → ``{"train": DataInfo}``: open_clip's arguments to
the PO training stream (``open_clip_po.data.reader``).

Follows ``open_clip_train.data.get_wds_dataset``: ``::`` for several sources, ``--train-num-samples`` or
``sizes.json``, ``--dataset-resampled`` with ``--train-data-upsampling-factors``, shards split by node
(``args.rank``/``args.world_size``) and by DataLoader worker, shuffling seeded by ``--seed`` and the shared
epoch, and the same ``num_samples``/``num_batches`` rounding. Patterns are expanded (and refused when they match
no file or name an unfinished build) by ``open_clip_po.data.patterns``.
"""
from __future__ import annotations

import logging
import math

from open_clip import tokenize as clip_tokenize
from open_clip_train.data import DataInfo, SharedEpoch
from torch.utils.data import DataLoader

from ..losses.distributed import world_info
from .errors import DataError
from .patterns import dataset_size, expand_shards
from .publish import SIZES_FILE
from .reader import POLoader, PreferenceDataset


def _rank_world(args) -> tuple[int, int]:
    rank, world = getattr(args, "rank", None), getattr(args, "world_size", None)
    if rank is None or world is None:
        return world_info()
    return int(rank), int(world)


def _reg_urls(args, reg_batch_size: int, resampled: bool):
    reg_data = getattr(args, "po_reg_data", None)
    if not reg_data:
        return None
    reg_urls, _ = expand_shards(reg_data, flag="--po-reg-data")
    reg_size = getattr(args, "po_reg_num_samples", None) or dataset_size(reg_urls)
    logging.info("D_reg: %d shard(s), %s samples, %d per batch, %s", len(reg_urls),
                 reg_size if reg_size else "unknown", reg_batch_size, "resampled" if resampled else "cycled")
    return reg_urls


def get_po_data(args, preprocess_fns, epoch: int = 0, tokenizer=None) -> dict:
    """``{"train": DataInfo}`` for PO training; the batch layout is in ``open_clip_po.data.reader``."""
    train_data = getattr(args, "train_data", None)
    if not train_data:
        raise DataError("--train-data (triplet shards) is required for preference optimisation")
    if tokenizer is None:
        tokenizer = clip_tokenize  # CLIP's BPE tokenizer, context 77
    resampled = bool(getattr(args, "dataset_resampled", False))
    factors = getattr(args, "train_data_upsampling_factors", None)
    if factors is not None and not resampled:
        raise DataError("--train-data-upsampling-factors needs --dataset-resampled (as in open_clip)")
    urls, weights = expand_shards(train_data, factors)
    rank, world_size = _rank_world(args)
    workers = int(getattr(args, "workers", 0) or 0)
    batch_size = int(getattr(args, "batch_size"))
    reg_batch_size = getattr(args, "po_reg_batch_size", None) or batch_size

    num_samples = getattr(args, "train_num_samples", None) or dataset_size(urls)
    if not num_samples:
        raise DataError(f"the number of training samples in --train-data {train_data} is unknown: no "
                        f"{SIZES_FILE} beside the shards (if an open_clip_po builder wrote them, its run did not "
                        "finish: run it again); or give --train-num-samples")
    if not resampled and len(urls) < max(1, workers) * world_size:
        raise DataError(f"{len(urls)} shard(s) for {max(1, workers)} worker(s) x {world_size} rank(s): every "
                        "reader needs a shard (use more shards, fewer workers, or --dataset-resampled)")
    # open_clip's rounding: the same number of full batches on every worker of every rank.
    global_batch_size = batch_size * world_size
    num_batches = math.ceil(num_samples / global_batch_size)
    num_worker_batches = math.ceil(num_batches / max(1, workers))
    num_batches = num_worker_batches * max(1, workers)
    num_samples = num_batches * global_batch_size

    shared_epoch = SharedEpoch(epoch=epoch)
    dataset = PreferenceDataset(
        urls, weights, _reg_urls(args, reg_batch_size, resampled), resampled=resampled, batch_size=batch_size,
        reg_batch_size=reg_batch_size, num_worker_batches=num_worker_batches, preprocess=preprocess_fns[0],
        tokenizer=tokenizer, seed=int(getattr(args, "seed", 0) or 0), rank=rank, world_size=world_size,
        shared_epoch=shared_epoch, strict=bool(getattr(args, "po_strict_data", False)))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=workers > 0)
    return {"train": DataInfo(dataloader=POLoader(loader, num_batches, num_samples), shared_epoch=shared_epoch)}
