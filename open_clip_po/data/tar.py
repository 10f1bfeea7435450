"""Tar streaming: shards → members → samples, every broken or missing shard counted once.

Used by the training reader, evaluation and the demo. Members are read per shard with ``tarfile`` (shards are
opened by webdataset's ``url_opener``, so ``pipe:`` and URLs work) instead of ``tarfile_to_samples``:
webdataset >= 0.2.96 yields an end-of-shard ``{}`` that breaks open_clip's grouping (KeyError 'fname'); reading
per shard avoids the marker on every webdataset version and keeps samples from mixing across shards.
"""
from __future__ import annotations

import tarfile
import zlib
from functools import partial
from typing import Iterable, Iterator

from webdataset.tariterators import base_plus_ext, url_opener

from .skips import SkipCounter


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


def read_samples(shards: Iterable, counter: SkipCounter, prefix: str = "") -> Iterator[dict]:
    """Shard urls (or ``{"url": ...}`` dicts) → raw samples; unreadable and truncated shards are counted."""
    sources = ({"url": s} if isinstance(s, str) else s for s in shards)
    streams = url_opener(sources, handler=partial(_open_failed, counter, prefix))
    return group_members(iter_tar_members(streams, counter, prefix))
