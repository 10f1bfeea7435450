"""A learnable toy preference set written by hand in the documented shard format (README, "Data").

Images are solid colours with a little noise; y_w names the image's colour, y_l another colour. A random
po-tiny learns to prefer y_w within a few dozen steps.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}
TEMPLATE = "a photo of a {}."


def colour_image(name: str, rng: random.Random, size: int = 64) -> bytes:
    base = np.array(COLOURS[name], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 12, (size, size, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_toy_shards(out: Path, num_samples: int = 64, per_shard: int = 32, seed: int = 0,
                     image_size: int = 64) -> dict:
    """pref-%06d.tar triplets, reg-%06d.tar clean pairs, sizes.json, classnames.txt; returns brace patterns."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    sizes = {}
    for kind in ("pref", "reg"):
        for shard in range((num_samples + per_shard - 1) // per_shard):
            path = out / f"{kind}-{shard:06d}.tar"
            count = min(per_shard, num_samples - shard * per_shard)
            with tarfile.open(path, "w") as tar:
                for j in range(count):
                    key = f"{shard:04d}{j:04d}"
                    true = rng.randrange(len(names))
                    wrong = rng.choice([i for i in range(len(names)) if i != true])
                    _add(tar, f"{key}.png", colour_image(names[true], rng, image_size))
                    y_w = TEMPLATE.format(names[true]).encode()
                    _add(tar, f"{key}.txt", y_w)
                    if kind == "pref":
                        _add(tar, f"{key}.yw.txt", y_w)
                        _add(tar, f"{key}.yl.txt", TEMPLATE.format(names[wrong]).encode())
                        _add(tar, f"{key}.json", json.dumps({"label": true, "written": wrong}).encode())
            sizes[path.name] = count
    (out / "sizes.json").write_text(json.dumps(sizes))
    (out / "classnames.txt").write_text("\n".join(names) + "\n")
    last = (num_samples + per_shard - 1) // per_shard - 1
    return {kind: str(out / f"{kind}-{{000000..{last:06d}}}.tar") for kind in ("pref", "reg")}
