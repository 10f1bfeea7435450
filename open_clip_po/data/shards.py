"""The triplet shard format and a deterministic shard writer.

One sample is the tar members sharing a key (see docs/data.md, "Format"):
``KEY.jpg`` (or another of ``IMAGE_EXTENSIONS``) the image, ``KEY.yw.txt`` the preferred caption, ``KEY.yl.txt``
the dispreferred caption, ``KEY.txt`` a copy of y_w (stock open_clip loaders read it), ``KEY.json`` optional
metadata. D_reg shards are plain open_clip pairs (image + ``txt``). ``sizes.json`` maps shard file name to
sample count, as ``open_clip_train.data.get_dataset_size`` reads it.

Writers here are byte-deterministic (fixed mtime/uid/gid/names, members in the order given); how a set of shards
is published whole is ``open_clip_po.data.publish``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from ..atomic import disk_full_error, is_disk_full, writer_tag
from .publish import SIZES_FILE, StagedBuild

YW, YL, TXT, META = "yw.txt", "yl.txt", "txt", "json"
SHARD_PATTERN = "{prefix}-{index:06d}.tar"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")

__all__ = ["YW", "YL", "TXT", "META", "SIZES_FILE", "SHARD_PATTERN", "ShardWriter", "check_key",
           "tar_header", "fit_square", "encode_image", "load_image"]


def check_key(key: str) -> str:
    # A dot would split the key (webdataset takes everything after the first dot as the extension).
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+ (no dots, slashes or spaces)")
    return key


def _member_bytes(size: int) -> int:
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_header(name: str, size: int) -> bytes:
    """A GNU tar header for a regular file: mode 0644, uid/gid 0, no user names, mtime 0.

    Written by hand (not ``tarfile``) because building headers is a third of the writing time and the bytes then
    do not depend on the Python version; ``tarfile`` handles names longer than 100 bytes (GNU long name).
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    buf = b"".join([
        raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size, b"00000000000\0",
        b"        ", tarfile.REGTYPE, bytes(100), tarfile.GNU_MAGIC, bytes(32), bytes(32), bytes(8), bytes(8),
    ]).ljust(tarfile.BLOCKSIZE, b"\0")
    return buf[:148] + b"%06o\0" % sum(buf) + buf[155:]  # checksum: byte sum with the field as spaces


class ShardWriter:
    """Write samples to ``PREFIX-000000.tar, ...`` of a shard folder, rolling over at ``max_count``/``max_size``.

    Byte-identical output for identical input. Given a ``StagedBuild`` as ``out``, the shards are part of that
    build; given a folder, the writer is a build of its own: it locks the folder, writes into a staging folder,
    and ``close()`` publishes the shards, ``sizes.json`` and the completion manifest into it
    (replacing the shards of an earlier run with the same prefix; see ``open_clip_po.data.publish``). Leaving a
    ``with`` block by an exception publishes nothing.
    """

    def __init__(self, out: str | os.PathLike | StagedBuild, prefix: str, max_count: int = 10_000,
                 max_size: int = 3 << 30):
        if max_count < 1 or max_size < 1:
            raise ValueError("max_count and max_size must be positive")
        self._own_build = None
        build = out
        if not isinstance(out, StagedBuild):
            build = self._own_build = StagedBuild(out).open()
        self.build, self.folder = build, Path(build.path)
        self.prefix, self.max_count, self.max_size = prefix, max_count, max_size
        self.sizes: dict[str, int] = {}
        self._file = self._tmp = self._name = None
        self._count = self._offset = 0
        self._closed = False

    # -- shard lifecycle
    def _open_next(self) -> None:
        self._name = SHARD_PATTERN.format(prefix=self.prefix, index=len(self.sizes))
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self._name}.{writer_tag()}.", suffix=".tmp", dir=self.folder)
        self._file = os.fdopen(fd, "wb")
        self._count = self._offset = 0

    def _finish(self) -> None:
        if self._file is None:
            return
        # End of archive: two zero blocks, padded to a whole record, as tarfile and GNU tar write it.
        end = self._offset + 2 * tarfile.BLOCKSIZE
        with self._full_disk_named(end):
            self._file.write(bytes(2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
            self._file.close()
        os.replace(self._tmp, self.folder / self._name)
        self.sizes[self._name] = self._count
        self._file = self._tmp = None

    def _drop_partial(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # its buffer cannot be flushed (a full disk): the file goes anyway
            os.remove(self._tmp)
            self._file = self._tmp = None

    @contextlib.contextmanager
    def _full_disk_named(self, shard_bytes: int):
        """A full disk while writing the current shard: the partial shard is removed, then a one-line
        ``DiskFullError`` names the shard and the ``shard_bytes`` it needed so far."""
        try:
            yield
        except OSError as e:
            if not is_disk_full(e):
                raise
            name = self._name
            self._drop_partial()
            raise disk_full_error(e, self.build.out / name, "shard", written=shard_bytes) from e

    def _abort(self) -> None:
        self._drop_partial()
        self._closed = True
        if self._own_build is not None:
            self._own_build.abort()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extension (``"jpg"``, ``"yw.txt"``...) to bytes, written in order."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        check_key(key)
        need = sum(_member_bytes(len(v)) for v in members.values())
        if self._file is not None and self._count > 0 and (
                self._count >= self.max_count or self._offset + need + 2 * tarfile.BLOCKSIZE > self.max_size):
            self._finish()
        if self._file is None:
            self._open_next()
        with self._full_disk_named(self._offset + need):
            for ext, data in members.items():
                header = tar_header(f"{key}.{ext}", len(data))
                self._file.write(header + data + bytes(-len(data) % tarfile.BLOCKSIZE))
                self._offset += len(header) + _member_bytes(len(data)) - tarfile.BLOCKSIZE
        self._count += 1

    def close(self) -> dict[str, int]:
        if self._closed:
            return self.sizes
        self._finish()
        self._closed = True
        self.build.add_shards(self.prefix, self.sizes)
        if self._own_build is not None:
            self._own_build.commit()
        return self.sizes

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort()  # never leave a half-written shard, nor a sizes.json describing one
        return False


# -- images
def fit_square(image: Image.Image, size: int | None) -> Image.Image:
    """RGB; with ``size``, the centred square of the image resized to ``size x size``."""
    image = image.convert("RGB")
    if size is None or image.size == (size, size):
        return image
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # Resampling only the central square (box=) costs less than resizing everything and cropping after.
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def encode_image(image: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use jpg, png or webp")
    return buf.getvalue()


def load_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """RGB image; with ``min_side``, JPEGs are decoded at the smallest DCT scale keeping both sides >= it."""
    try:
        with Image.open(path) as im:
            if min_side is not None and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))
            return im.convert("RGB")
    except Exception as exn:  # Pillow raises several types; name the file once, clearly
        raise ValueError(f"cannot read image {path}: {exn}") from exn
