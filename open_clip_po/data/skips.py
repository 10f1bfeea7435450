"""Bad-sample accounting: every skipped sample is counted by kind, nothing is dropped silently.

Kinds (preference stream; the D_reg stream uses the same names prefixed ``reg_``):

- ``unreadable_shard``    a shard could not be opened (missing file, failed pipe/http)
- ``truncated_shard``     a shard's tar stream broke off or is corrupt (the samples read before are kept)
- ``missing_image``       no image member (an extension of ``image_files.IMAGE_EXTENSIONS``) under the key
- ``missing_yw``          no ``yw.txt`` member (preference stream only)
- ``missing_yl``          no ``yl.txt`` member (preference stream only)
- ``missing_caption``     no ``txt`` member (D_reg stream only)
- ``undecodable_text``    a caption is not valid UTF-8
- ``empty_caption``       a caption is empty or only whitespace
- ``identical_captions``  y_w and y_l give the same tokens (a pair that carries no preference)
- ``corrupt_image``       the image bytes do not decode

Counting happens where the sample is read (possibly a DataLoader worker); each batch carries the counts since the
worker's previous batch in ``batch["skipped"]``, the trainer feeds them to a :class:`SkipLedger`, which sums them
across ranks and logs them. Counts that no batch carried (a reader met them after its last batch, or yielded
none) wait in the loader; a ledger that ``watch``-es the loader collects them before it logs.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.distributed as dist

from ..losses.distributed import world_info

PREF_KINDS = ("unreadable_shard", "truncated_shard", "missing_image", "missing_yw", "missing_yl",
              "undecodable_text", "empty_caption", "identical_captions", "corrupt_image")
REG_KINDS = tuple("reg_" + k for k in ("unreadable_shard", "truncated_shard", "missing_image", "missing_caption",
                                      "undecodable_text", "empty_caption", "corrupt_image"))
SKIP_KINDS = PREF_KINDS + REG_KINDS
_WARN_FIRST = 3  # per kind and process: warn for the first few, then only count (the ledger logs the totals)


class BadSampleError(ValueError):
    """A bad sample under ``--po-strict-data``; the message names the kind, shard and key."""

    def __init__(self, message: str, kind: str | None = None, url: str | None = None, key: str | None = None):
        super().__init__(message)
        self.kind, self.url, self.key = kind, url, key


class SkipCounter:
    """Counts skips where they happen (one per reading process); ``drain()`` hands them over with a batch."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.pending: Counter = Counter()
        self._warned: Counter = Counter()

    def skip(self, kind: str, url, key, detail: str = "") -> None:
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}")
        where = f"shard {url}, key {key if key is not None else '(none)'}"
        if self.strict:
            raise BadSampleError(f"bad sample ({kind}) in {where}: {detail} [--po-strict-data]",
                                 kind=kind, url=url, key=key)
        self.pending[kind] += 1
        self._warned[kind] += 1
        level = logging.WARNING if self._warned[kind] <= _WARN_FIRST else logging.DEBUG
        logging.log(level, "skipping bad sample (%s) in %s: %s%s", kind, where, detail,
                     " (further ones of this kind are only counted)" if self._warned[kind] == _WARN_FIRST else "")

    def drain(self) -> dict[str, int]:
        out = dict(self.pending)
        self.pending.clear()
        return out


class SkipLedger:
    """Sums ``batch["skipped"]`` over an epoch and a run; ``all_reduce`` sums over ranks.

    ``add(skipped)`` per batch; ``watch(loader)`` once; ``log(epoch)`` at each epoch end and at the end of
    training. When
    torch.distributed is initialised, ``log`` and ``all_reduce`` are collectives: call them on every rank.
    """

    def __init__(self):
        self.totals: dict[str, int] = {k: 0 for k in SKIP_KINDS}
        self._logged: dict[str, int] = dict(self.totals)  # global totals at the previous log()
        self._watched: list = []

    def watch(self, loader) -> None:
        """Also count what ``loader.drain_skips()`` holds (skips no batch carried) at every ``log``."""
        self._watched.append(loader)

    def add(self, skipped: dict | None) -> None:
        for kind, count in (skipped or {}).items():
            if kind not in self.totals:
                raise ValueError(f"unknown skip kind {kind!r}; known: {', '.join(SKIP_KINDS)}")
            self.totals[kind] += int(count)

    def all_reduce(self) -> dict[str, int]:
        """Totals summed over ranks (this rank's totals without torch.distributed)."""
        if world_info()[1] == 1:
            return dict(self.totals)
        device = "cpu"
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = torch.tensor([self.totals[k] for k in SKIP_KINDS], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        return dict(zip(SKIP_KINDS, counts.tolist()))

    def log(self, epoch: int | None = None) -> dict[str, int]:
        """Log one line: skips since the previous log and in total (all ranks); return the totals."""
        for loader in self._watched:
            self.add(loader.drain_skips())
        totals = self.all_reduce()
        since = {k: totals[k] - self._logged[k] for k in SKIP_KINDS}
        self._logged = dict(totals)
        when = "end of training" if epoch is None else f"epoch {epoch}"
        logging.info("bad samples skipped (%s, all ranks): %s; run total: %s", when, _fmt(since), _fmt(totals))
        return totals


def _fmt(counts: dict[str, int]) -> str:
    shown = [f"{k}={v}" for k, v in counts.items() if v]
    return (", ".join(shown) + f" (sum {sum(counts.values())})") if shown else "none"
