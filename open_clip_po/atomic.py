"""Atomic file writes: a half-written file never carries its final name (checkpoints, shards, reports, plots).

A temporary file is named ``.NAME.PID@HOST.RANDOM.tmp`` beside its target, so that leftovers of a killed writer
can be told from files still being written: ``remove_stale_temp_files(folder)`` deletes those whose writer no
longer runs on this host.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

# Temporary names from before writers recorded their PID carry none; such a file untouched this long is stale.
LEGACY_TEMP_AGE = 3600.0
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.tmp$")
_LEGACY_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def remove_stale_temp_files(folder: str | os.PathLike, legacy_age: float = LEGACY_TEMP_AGE) -> list[Path]:
    """Delete the temporary files of killed writers in ``folder`` (not recursive); return what was deleted.

    A temporary file is stale when its writer (``PID@HOST`` in its name) no longer runs on this host; one
    without that tag (written before tags existed) when untouched for ``legacy_age`` seconds. Files of writers
    on other hosts are left alone: their liveness cannot be checked from here.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        if not path.name.startswith(".") or not path.name.endswith(".tmp") or not path.is_file():
            continue
        tagged = _TEMP_NAME.match(path.name)
        try:
            if tagged:
                stale = is_stale(int(tagged["pid"]), tagged["host"])
            else:
                stale = bool(_LEGACY_TEMP_NAME.match(path.name)) and now - path.stat().st_mtime > legacy_age
            if stale:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue  # its writer finished (renamed it) meanwhile
    if removed:
        logging.info("removed %d temporary file(s) of killed writers in %s: %s", len(removed), folder,
                     ", ".join(p.name for p in removed))
    return removed
