"""Atomic file writes: a half-written file never carries its final name (checkpoints, shards, reports, plots).

``write_bytes`` / ``write_text`` / ``write_json`` / ``write_csv`` are the one way results reach a file.

A temporary file is named ``.NAME.PID@HOST.RANDOM.tmp`` beside its target, so that leftovers of a killed writer
can be told from files still being written: ``remove_stale_temp_files(folder)`` deletes those whose writer no
longer runs on this host.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
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
