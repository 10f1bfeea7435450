"""Triplet shards for preference optimisation: the format, the training reader, bad-sample accounting, builders.

- ``get_po_data(args, preprocess_fns, epoch, tokenizer)`` → ``{"train": DataInfo}`` (``reader.py``)
- ``SkipLedger``, ``BadSampleError``, ``SKIP_KINDS`` (``skips.py``)
- builders: ``python -m open_clip_po.data.typographic | gender | pairs`` (``--help``)
"""
from .reader import PreferenceDataset, dataset_size, get_po_data
from .shards import IMAGE_EXTS, META, SIZES_FILE, TXT, YL, YW, ShardWriter, update_sizes
from .skips import PREF_KINDS, REG_KINDS, SKIP_KINDS, BadSampleError, SkipCounter, SkipLedger

__all__ = [
    "get_po_data", "PreferenceDataset", "dataset_size",
    "SkipLedger", "SkipCounter", "BadSampleError", "SKIP_KINDS", "PREF_KINDS", "REG_KINDS",
    "ShardWriter", "update_sizes", "IMAGE_EXTS", "YW", "YL", "TXT", "META", "SIZES_FILE",
]
