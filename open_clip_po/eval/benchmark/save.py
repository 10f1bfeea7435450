"""``--save-typographic DIR``: the typographic copies in CLIP_benchmark's webdataset layout.

``DIR/wds_<name>/<split>/{0..n-1}.tar`` + ``nshards.txt``, ``classnames.txt``,
``zeroshot_classification_templates.txt`` (the class names and templates the run used) and ``typographic.json``
(how the copy was made). A sample is ``s<index>.jpg`` (the JPEG the run evaluated), ``.cls`` (true class) and
``.json`` (``label``, ``written``, ``written_name``, ``index`` and the drawing parameters), so CLIP_benchmark reads
the copy as it reads the original (``clip_benchmark eval --dataset wds/<name> --dataset_root DIR/wds_<name>``),
and so does ``eval benchmark --dataset-root DIR``.

Each process writes its own parts (``<split>/.parts/r<rank>-<n>.tar``); after the results are gathered, rank 0
numbers them into the final shards, replacing the shards of an earlier copy in that folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

from open_clip_po.atomic import write_text
from open_clip_po.data.shards import tar_header

PARTS = ".parts"
MAX_COUNT = 10_000  # samples per shard, CLIP_benchmark's default


class _Part:
    """One tar file written member by member; it gets its name only when complete."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file, self.count = open(self.tmp, "wb"), 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            self.file.write(tar_header(f"{key}.{ext}", len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE))
        self.count += 1

    def finish(self) -> None:
        self.file.write(bytes(2 * tarfile.BLOCKSIZE))  # end of archive
        self.file.close()
        os.replace(self.tmp, self.path)


class CopyWriter:
    def __init__(self, folder: str | Path, split: str, rank: int, classnames, templates, description: dict):
        self.folder, self.split, self.rank = Path(folder), split, rank
        self.classnames, self.templates, self.description = list(classnames), list(templates), description
        self.parts_dir = self.folder / split / PARTS
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.parts_dir.glob(f"r{rank:05d}-*"):  # this rank's leftovers of a killed run
            stale.unlink()
        self.part: _Part | None = None
        self.written = 0

    def add(self, index: int, label: int, written: int, data: bytes, params: dict) -> None:
        if self.part is None or self.part.count >= MAX_COUNT:
            self._roll()
        meta = {"label": label, "written": written, "written_name": self.classnames[written], "index": index,
                "attack": params}
        self.part.add(f"s{index:07d}", {"jpg": data, "cls": str(label).encode(),
                                        "json": json.dumps(meta, sort_keys=True).encode()})
        self.written += 1

    def _roll(self) -> None:
        if self.part is not None:
            self.part.finish()
        number = len(list(self.parts_dir.glob(f"r{self.rank:05d}-*.tar")))
        self.part = _Part(self.parts_dir / f"r{self.rank:05d}-{number:06d}.tar")

    def close(self) -> None:
        if self.part is not None:
            self.part.finish()
            self.part = None

    def publish(self, world_size: int) -> int:
        """Rank 0, once every rank closed its parts: the final shards and metadata; returns their number."""
        split_dir = self.folder / self.split
        own = re.compile(r"^r(\d{5})-(\d{6})\.tar$")
        parts = sorted((tuple(map(int, m.groups())), p) for p in self.parts_dir.iterdir()
                       if (m := own.match(p.name)) and int(m.group(1)) < world_size)
        for old in split_dir.iterdir():
            if re.fullmatch(r"\d+\.tar", old.name):
                old.unlink()
        for number, (_, part) in enumerate(parts):
            os.replace(part, split_dir / f"{number}.tar")
        shutil.rmtree(self.parts_dir, ignore_errors=True)  # leftovers of ranks this run did not have
        write_text(split_dir / "nshards.txt", f"{len(parts)}\n")
        write_text(self.folder / "classnames.txt", "".join(n + "\n" for n in self.classnames))
        write_text(self.folder / "zeroshot_classification_templates.txt", "".join(t + "\n" for t in self.templates))
        write_text(self.folder / "typographic.json", json.dumps(self.description, indent=2) + "\n")
        return len(parts)
