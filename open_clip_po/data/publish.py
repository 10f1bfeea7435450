"""Shard sets are built locked and staged, and published whole: a folder holds one complete set or another.

- Lock: ``OUT/.build.lock`` is held (``flock``) for the whole build and names the holder (PID, host); a second
  builder refuses at once. The kernel drops the lock of a process that dies, so a killed builder's lock is taken
  over by the next one (with a log line naming the dead holder).
- Staging: a build writes into ``.OUT.staging-PID@HOST`` beside ``OUT``. Publishing hard-links the files of
  ``OUT`` that the build does not replace into the staging folder (a rebuild replaces its own shard prefixes,
  ``sizes.json``, ``classnames.txt`` ...; other sets in the folder stay), writes ``sizes.json`` and then the
  completion manifest ``build.json`` last, and swaps the two folders in one atomic ``renameat2(RENAME_EXCHANGE)``.
  Killed anywhere before the swap, ``OUT`` is untouched; after it, ``OUT`` holds the new set.
- Readers (training and evaluation) refuse a folder that holds ``.build.lock`` but neither shards nor
  ``build.json`` (its first build did not finish), and shards whose byte size differs from the manifest (changed
  after the build). Folders without a manifest (other tools, older builders) are read as before.
- The next build removes staging folders and temporary files of killed builders.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from ..atomic import is_stale, remove_stale_temp_files, this_host, write_text, writer_tag
from .errors import BuildLockedError, DataError, IncompleteBuildError

LOCK_FILE = ".build.lock"
MANIFEST_FILE = "build.json"
SIZES_FILE = "sizes.json"
_STAGING = re.compile(r"^\.(?P<out>.+)\.staging-(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class BuildLock:
    """The exclusive lock of one output folder; see the module docstring."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "BuildLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise BuildLockedError(
                f"{self.folder} is being built by PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('started', '?')}); wait for it to finish or choose another --out") from None
        previous = _read_holder(fd)
        if previous.get("pid") is not None:
            logging.warning("taking over the build lock of %s from PID %s on host %s, which no longer holds it "
                            "(killed?)", self.folder, previous["pid"], previous.get("host", "?"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": this_host(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def exchange_folders(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux ``renameat2``); two renames where the filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")
    # No atomic exchange (e.g. NFS): a kill between these two renames leaves b's old set in a's place.
    parked = a.with_name(a.name + ".old")
    os.rename(b, parked)
    os.rename(a, b)
    os.rename(parked, a)


class StagedBuild:
    """``with StagedBuild(out) as build:`` write into ``build.path``; on success the set is published into
    ``out`` (see the module docstring), on an exception nothing of it is. ``ShardWriter(build, prefix)`` writes
    shards that are part of the build."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(os.path.abspath(out))
        self.path = self.out.parent / f".{self.out.name}.staging-{writer_tag()}"
        self.sizes: dict[str, int] = {}
        self.prefixes: set[str] = set()
        self._lock = BuildLock(self.out)

    def open(self) -> "StagedBuild":
        """Lock ``out``, clear leftovers of killed builds, make the staging folder (``with`` does this)."""
        self._lock.acquire()
        try:
            foreign = sorted(p.name for p in self.out.iterdir() if p.is_dir())
            if foreign:
                raise DataError(f"--out {self.out} holds the folder {foreign[0]!r}: a shard folder holds files "
                                "only (a build swaps the whole folder); choose another --out")
            remove_stale_staging(self.out)
            remove_stale_temp_files(self.out)
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir()
        except BaseException:
            self._lock.release()
            raise
        return self

    def add_shards(self, prefix: str, sizes: dict[str, int]) -> None:
        self.prefixes.add(prefix)
        self.sizes.update(sizes)

    def _replaced(self, name: str) -> bool:
        if name in (LOCK_FILE, MANIFEST_FILE, SIZES_FILE) or (name.startswith(".") and name.endswith(".tmp")):
            return True
        if (self.path / name).exists():
            return True
        return any(re.fullmatch(re.escape(p) + r"-\d{6}\.tar", name) for p in self.prefixes)

    def _keep_previous(self) -> dict[str, int]:
        """Hard-link the files of ``out`` that this build does not replace; return their sizes.json entries."""
        old_sizes = read_json(self.out / SIZES_FILE) or {}
        kept, dropped = {}, []
        for path in sorted(self.out.iterdir()):
            if self._replaced(path.name):
                if path.name in old_sizes and not (self.path / path.name).exists():
                    dropped.append(path.name)
                continue
            try:
                os.link(path, self.path / path.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(path, self.path / path.name)
            if path.name in old_sizes:
                kept[path.name] = int(old_sizes[path.name])
        if dropped:
            logging.info("dropping %d shard(s) of the previous build of %s: %s", len(dropped), self.out,
                         ", ".join(dropped))
        return kept

    def publish(self) -> None:
        sizes = {**self._keep_previous(), **self.sizes}
        if sizes:
            write_text(self.path / SIZES_FILE, json.dumps(sizes, indent=1, sort_keys=True) + "\n")
        files = {p.name: p.stat().st_size for p in sorted(self.path.iterdir()) if p.is_file()}
        # No time or host in it: the same inputs and seed give byte-identical folders.
        manifest = {"complete": True, "files": files, "samples": sizes}
        write_text(self.path / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")  # last
        exchange_folders(self.path, self.out)
        shutil.rmtree(self.path)  # now the previous contents of out

    def commit(self) -> None:
        """Publish the staged set and unlock."""
        try:
            self.publish()
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Discard the staged set and unlock; ``out`` stays as it was."""
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._lock.release()

    def __enter__(self) -> "StagedBuild":
        return self.open()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def remove_stale_staging(out: Path) -> None:
    """Delete staging folders that killed builders of ``out`` left beside it."""
    for path in out.parent.iterdir():
        match = _STAGING.match(path.name)
        if match and match["out"] == out.name and is_stale(int(match["pid"]), match["host"]):
            shutil.rmtree(path, ignore_errors=True)
            logging.info("removed the staging folder %s of a killed build", path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exn:
        raise DataError(f"{path} is not valid JSON ({exn}); rebuild the shards") from None


def check_complete(urls) -> None:
    """Refuse shards that differ from their folder's completion manifest (added or changed after the build).

    A killed first build leaves no shard in its folder (they are staged elsewhere): its patterns match nothing,
    which ``open_clip_po.data.patterns`` reports. Folders without a manifest (other tools, older builders) are
    read as they are.
    """
    manifests: dict[str, dict | None] = {}
    for url in urls:
        if "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
            continue  # remote, or missing (counted as an unreadable shard when read)
        folder, name = os.path.split(url)
        if folder not in manifests:
            manifests[folder] = read_json(Path(folder or ".") / MANIFEST_FILE)
        files = (manifests[folder] or {}).get("files")
        if files is None:
            continue
        if name not in files or files[name] != os.path.getsize(url):
            raise IncompleteBuildError(
                f"{url} is not the shard that {os.path.join(folder, MANIFEST_FILE)} lists (added or changed "
                "after the build); run the builder again")
