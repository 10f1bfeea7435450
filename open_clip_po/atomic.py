"""Atomic file writes: a half-written file never carries its final name (checkpoints, shards, reports, plots).

``write_bytes`` / ``write_text`` / ``write_json`` / ``write_csv`` are the one way results reach a file.

A temporary file is named ``.NAME.PID@HOST.RANDOM.tmp`` beside its target, so that leftovers of a killed writer
can be told from files still being written: ``remove_stale_temp_files(folder)`` deletes those whose writer no
longer runs on this host.

A write that meets a full disk (ENOSPC, a quota's EDQUOT, or torch's zip writer reporting it as "unexpected pos")
raises ``DiskFullError``, whose message is one line: what was being written, where, how much space it needed and
how much is free. The half-written temporary file is removed first, and the target keeps its previous content.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.tmp$")


def this_host() -> str:
    """The host name, reduced to ``[A-Za-z0-9-]`` so that it fits in file names."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def writer_tag() -> str:
    """``PID@HOST`` of this process, as temporary and staging names carry it."""
    return f"{os.getpid()}@{this_host()}"


def is_stale(tag_pid: int, tag_host: str) -> bool:
    """A ``PID@HOST`` tag whose process is gone (only decidable on this host)."""
    return tag_host == this_host() and tag_pid != os.getpid() and not pid_alive(tag_pid)


class DiskFullError(OSError):
    """A file could not be written for want of space; ``str()`` is one line a user can act on."""

    def __init__(self, message: str, path: str | os.PathLike, needed: int | None, free: int | None):
        super().__init__(errno.ENOSPC, message)
        self.path, self.needed, self.free = Path(path), needed, free

    def __str__(self) -> str:
        return self.strerror


# torch.save reports a failed write of its zip container without an errno, e.g.
# "[enforce fail at inline_container.cc:672] . unexpected pos 15775360 vs 15775252" or
# "PytorchStreamWriter failed writing file data/0: file write failed".
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def human_bytes(n: int | float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system ``path`` (or its nearest existing parent) is on."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(mount_point(path)).free
    except OSError:
        return None


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, or torch's writer failing the way a full disk makes it fail."""
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_WRITE_FAILED)


def disk_full_error(error: BaseException, path: str | os.PathLike, what: str = "file",
                    needed: int | None = None, written: int = 0, atomic: bool = True) -> DiskFullError:
    """The one-line error for ``error`` (see :func:`is_disk_full`) met while writing ``what`` to ``path``.

    ``needed``: the size the file would have had, if known; ``written``: bytes written before the failure (a
    lower bound when ``needed`` is unknown); ``atomic``: the write was atomic, so ``path`` is as it was. Call it
    once the partial file is gone, so that "free" is what the user has to work with.
    """
    if isinstance(error, DiskFullError):
        return error
    free = free_bytes(Path(path).parent)
    if needed is not None:
        size = f"it needs about {human_bytes(needed)}"
    else:
        size = f"it needs more than the {human_bytes(written)} written when the disk filled" if written else \
            "its size is unknown"
    where = "free space unknown" if free is None else f"{human_bytes(free)} free on {mount_point(Path(path).parent)}"
    cause = ("disk quota exceeded" if isinstance(error, OSError) and error.errno == errno.EDQUOT
             else "no space left on device")
    if isinstance(error, RuntimeError) and (free is None or needed is None or free >= needed):
        # torch gives no errno, and here the free space does not show a full disk: say what torch said
        cause = f"torch's file writer failed ({str(error).splitlines()[0].strip()[:100]}): a full disk or quota?"
    kept = "; nothing was written there (an earlier file of that name is unchanged)" if atomic else ""
    return DiskFullError(f"cannot write {what} {path}: {cause}; {size}, {where}{kept}", path, needed, free)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file", needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block completes.

    A full disk meets the caller as ``DiskFullError`` naming ``what`` (e.g. "checkpoint"), ``path`` and ``needed``
    (its expected size in bytes, if known); the partial file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if is_disk_full(e):  # no room even for a directory entry
            raise disk_full_error(e, path, what, needed) from e
        raise
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        if is_disk_full(e):
            raise disk_full_error(e, path, what, needed, written) from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> Path:
    with atomic_path(path, what, needed=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    return write_bytes(path, text.encode("utf-8"), what)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not defined" (e.g. no crossing)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(obj, path: str | os.PathLike, indent: int = 2, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (non-finite floats as null; anything else JSON cannot hold as its ``str``)."""
    return write_text(path, json.dumps(_json_safe(obj), indent=indent, sort_keys=sort_keys, default=str) + "\n")


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Iterable[str] | None = None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of killed writers in ``folder`` (not recursive); return what was deleted.

    A temporary file is stale when its writer (``PID@HOST`` in its name) no longer runs on this host. Files of
    writers on other hosts are left alone: their liveness cannot be checked from here.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.name.startswith(".") or not path.name.endswith(".tmp") or not path.is_file():
            continue
        tagged = _TEMP_NAME.match(path.name)
        try:
            if tagged and is_stale(int(tagged["pid"]), tagged["host"]):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue  # its writer finished (renamed it) meanwhile
    if removed:
        logging.info("removed %d temporary file(s) of killed writers in %s: %s", len(removed), folder,
                     ", ".join(p.name for p in removed))
    return removed
