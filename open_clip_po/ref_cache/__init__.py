"""The frozen reference's features computed once, ahead of training, and joined to each batch.

``python -m open_clip_po.ref_cache --model M --pretrained P --train-data ... [--po-reg-data ...] --out DIR``
writes, per shard, the reference's image features keyed by sample key and the text features of the shard's
captions, plus a manifest of what they were computed with (``store``); ``--po-ref-cache DIR`` on
``open_clip_po.main`` then builds no reference model (``reference.CachedReference``).

Why features and not log-probs (TRL's ``precompute_ref_log_probs``): π_ref(y|x) is a softmax over the global
batch's candidates, so it depends on which samples meet in a batch; features do not.
"""
from .store import CacheError, RefCache, deterministic_augmentation, load_ref_cache

__all__ = ["CacheError", "RefCache", "deterministic_augmentation", "load_ref_cache"]
