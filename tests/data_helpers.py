"""Helpers for tests/test_data_*.py: generated image folders, hand-written shards, reading every sample back."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("cat", "dog", "golden_retriever")


@pytest.fixture(scope="module")
def tokenizer():
    """po-tiny's tokenizer (import it into a test module to use it as a fixture)."""
    import open_clip
    import open_clip_po  # noqa: F401  (registers po-tiny)

    return open_clip.get_tokenizer("po-tiny")


def noise_image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def image_bytes(seed: int, fmt: str = "PNG", size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    noise_image(seed, size).save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root: Path, per_class: int = 4, classes=CLASSES) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise_image(100 * c + i, size=(40 + 3 * i, 30 + 2 * c)).save(root / name / f"img{i}.jpg", quality=90)
    return root


def write_tar(path: Path, samples) -> Path:
    """A shard written with plain ``tarfile``: ``samples`` is ``[(key, {ext: bytes})]``."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def triplet(seed: int, y_w: str, y_l: str, fmt: str = "png") -> dict:
    return {fmt: image_bytes(seed, "PNG" if fmt == "png" else "JPEG"), "yw.txt": y_w.encode(),
            "yl.txt": y_l.encode(), "txt": y_w.encode()}


def pixels(image: Image.Image) -> torch.Tensor:
    """A 'preprocess' that keeps the exact pixels, so a batch row can be traced back to its sample."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def pixel_key(image) -> bytes:
    if isinstance(image, torch.Tensor):
        return image.numpy().tobytes()
    return pixels(image).numpy().tobytes()


def shard_contents(paths) -> dict[bytes, tuple[str, str]]:
    """pixel key → (y_w, y_l) for every sample of the given shards, read independently with tarfile."""
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".", 1)[0] for name in members})
        for key in keys:
            image = next(members[f"{key}.{e}"] for e in ("jpg", "png") if f"{key}.{e}" in members)
            with Image.open(io.BytesIO(image)) as im:
                out[pixel_key(im)] = (members[f"{key}.yw.txt"].decode(), members[f"{key}.yl.txt"].decode())
    return out


def po_args(**kw) -> SimpleNamespace:
    base = dict(train_data=None, train_num_samples=None, train_data_upsampling_factors=None,
                dataset_resampled=False, batch_size=2, workers=0, seed=0, world_size=1, rank=0, po_reg_data=None,
                po_reg_batch_size=None, po_reg_num_samples=None, po_strict_data=False)
    base.update(kw)
    return SimpleNamespace(**base)


def read_epoch(info, epoch: int = 0):
    """All batches of one epoch, as a list of dicts."""
    info.set_epoch(epoch)
    return list(info.dataloader)
