"""The triplet shard format and a deterministic, atomic WebDataset shard writer.

One sample is the tar members sharing a key (see README, "Data"):
``KEY.jpg`` (or png/jpeg/webp) the image, ``KEY.yw.txt`` the preferred caption, ``KEY.yl.txt`` the
dispreferred caption, ``KEY.txt`` a copy of y_w (stock open_clip loaders read it), ``KEY.json`` optional
metadata. D_reg shards are plain open_clip pairs (image + ``txt``). ``sizes.json`` maps shard file name to
sample count, as ``open_clip_train.data.get_dataset_size`` reads it.

Writers here are byte-deterministic (fixed mtime/uid/gid/names, members in the order given) and atomic (a
shard is written under a temporary name and renamed when complete).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import tempfile
import tarfile
from pathlib import Path

from PIL import Image

from ..atomic import write_text

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the reader accepts as the image member
YW, YL, TXT, META = "yw.txt", "yl.txt", "txt", "json"
SIZES_FILE = "sizes.json"
SHARD_PATTERN = "{prefix}-{index:06d}.tar"
# Source images a builder accepts in an image folder (anything Pillow opens; re-encoded on the way).
SOURCE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_key(key: str) -> str:
    # A dot would split the key (webdataset takes everything after the first dot as the extension).
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+ (no dots, slashes or spaces)")
    return key


def update_sizes(out_dir: str | os.PathLike, sizes: dict[str, int], drop: tuple[str, ...] = ()) -> Path:
    """Merge ``sizes`` into ``out_dir/sizes.json`` (atomically), removing entries named in ``drop``."""
    path = Path(out_dir) / SIZES_FILE
    merged = json.loads(path.read_text()) if path.exists() else {}
    for name in drop:
        merged.pop(name, None)
    merged.update({k: int(v) for k, v in sizes.items()})
    write_text(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return path


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
    """Write samples to ``out_dir/PREFIX-000000.tar, ...``, rolling over at ``max_count``/``max_size``.

    Byte-identical output for identical input; each shard appears under its final name only once complete.
    ``close()`` records the counts in ``sizes.json`` and removes stale ``PREFIX-*.tar`` from earlier runs.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, max_count: int = 10_000,
                 max_size: int = 3 << 30):
        if max_count < 1 or max_size < 1:
            raise ValueError("max_count and max_size must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count, self.max_size = prefix, max_count, max_size
        self.sizes: dict[str, int] = {}
        self._file = self._tmp = self._name = None
        self._count = self._offset = 0
        self._closed = False

    # -- shard lifecycle
    def _open_next(self) -> None:
        self._name = SHARD_PATTERN.format(prefix=self.prefix, index=len(self.sizes))
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self._name}.", suffix=".tmp", dir=self.out_dir)
        self._file = os.fdopen(fd, "wb")
        self._count = self._offset = 0

    def _finish(self) -> None:
        if self._file is None:
            return
        # End of archive: two zero blocks, padded to a whole record, as tarfile and GNU tar write it.
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._file.write(bytes(2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
        self._file.close()
        os.replace(self._tmp, self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._file = self._tmp = None

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            os.remove(self._tmp)
            self._file = self._tmp = None

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
        stale = []
        pattern = re.compile(re.escape(self.prefix) + r"-\d{6}\.tar$")
        for path in sorted(self.out_dir.iterdir()):
            if pattern.match(path.name) and path.name not in self.sizes:
                stale.append(path.name)
                path.unlink()
        if stale:
            logging.info("removed %d stale shard(s) from an earlier run: %s", len(stale), ", ".join(stale))
        update_sizes(self.out_dir, self.sizes, drop=tuple(stale))
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
        raise ValueError(f"unknown image format {fmt!r}; use one of {IMAGE_EXTS}")
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


# -- image folders (one sub-folder per class, like torchvision's ImageFolder)
def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folders and sorted ``(path, class_index)`` items."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected DIR/<class>/<image>)")
    items = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in SOURCE_EXTS and p.is_file())
        if not files:
            logging.warning("class folder %s has no images", root / name)
        items.extend((p, index) for p in files)
    if not items:
        raise ValueError(f"{root} has no images with extensions {sorted(SOURCE_EXTS)}")
    return classes, items


def load_classnames(path: str | os.PathLike | None, folders: list[str]) -> list[str]:
    """Readable class names: one per line in FILE (in sorted-folder order), else folder names with _ → space."""
    if path is None:
        return [f.replace("_", " ") for f in folders]
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{path} has {len(names)} class names but the image folder has {len(folders)} classes")
    return names


def format_caption(template: str, **fields) -> str:
    try:
        return template.format(*fields.values()) if "{}" in template else template.format(**fields)
    except (IndexError, KeyError) as exn:
        raise ValueError(f"caption template {template!r} needs a field we do not have ({exn}); "
                         f"available: {sorted(fields)}") from None


def add_writer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sharding")
    g.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    g.add_argument("--max-size", type=float, default=3.0, help="shard size limit in GB (default 3)")
    g.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"],
                   help="encoding of written images (default jpg)")
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    g.add_argument("--seed", type=int, default=0, help="same seed and inputs give byte-identical shards")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def writer_kwargs(args) -> dict:
    return dict(max_count=args.max_count, max_size=int(args.max_size * (1 << 30)))
