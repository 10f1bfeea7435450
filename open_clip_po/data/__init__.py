"""The data layer: triplet shards for preference optimisation, read by training and evaluation, written by the
builders. One module per job (see docs/data.md, "Layout"):

- conventions: ``classnames`` (class-name files), ``image_files`` (image extensions, class folders),
  ``gender_csv`` (the gender CSV), ``shards`` (the shard format and writer)
- reading: ``patterns`` (shard patterns → urls), ``tar`` (tar streaming), ``decode`` (samples → tensors),
  ``skips`` (bad-sample accounting), ``reader`` (the training stream), ``loader`` (``get_po_data``)
- building: ``publish`` (locked, staged, whole-set publishing), ``typographic``, ``gender``, ``pairs``
  (``python -m open_clip_po.data.typographic | gender | pairs --help``)

The training names (``get_po_data`` ...) load open_clip_train and webdataset on first use only.
"""
from .classnames import read_classnames
from .errors import (BuildLockedError, ClassnamesError, DataError, GenderCsvError, IncompleteBuildError,
                     ShardPatternError)
from .publish import StagedBuild
from .shards import META, SIZES_FILE, TXT, YL, YW, ShardWriter
from .skips import PREF_KINDS, REG_KINDS, SKIP_KINDS, BadSampleError, SkipCounter, SkipLedger

_LAZY = {"get_po_data": "loader", "PreferenceDataset": "reader", "POLoader": "reader", "dataset_size": "patterns"}

__all__ = [
    "get_po_data", "PreferenceDataset", "POLoader", "dataset_size",
    "SkipLedger", "SkipCounter", "BadSampleError", "SKIP_KINDS", "PREF_KINDS", "REG_KINDS",
    "ShardWriter", "StagedBuild", "YW", "YL", "TXT", "META", "SIZES_FILE", "read_classnames",
    "DataError", "ClassnamesError", "GenderCsvError", "ShardPatternError", "IncompleteBuildError",
    "BuildLockedError",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
