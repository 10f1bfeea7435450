"""Data benchmarks: the triplet reader against open_clip's own pair reader, and typographic shard building.

1. Reader: the same triplet shards (224 px JPEG, written by the typographic builder) read by
   ``open_clip_po.data.get_po_data`` (decodes the image, y_w and y_l, checks each sample) and by open_clip's
   training pipeline from ``open_clip_train.data.get_wds_dataset`` (image + ``txt``), same transforms
   (ViT-B-32 train transforms), batch size, shuffle buffers, in-process (workers 0). Ratio = ours / open_clip's
   samples per CPU-second (the machine is shared; wall-clock ratio in the details); goal >= 0.9.
   open_clip's pipeline is rebuilt here stage by stage from its own functions, with one change: webdataset
   >= 0.2.96 ends every shard with ``{}``, which its ``group_by_keys_nothrow`` cannot group (KeyError 'fname'),
   so the tar expander is called with ``eof_value=None``. (Only ``open_clip_po.trainer.seam`` may patch open_clip.)
2. Typographic building: images per second for ``build_typographic`` at 224 px (source images 256 px JPEG;
   per image one attacked and one clean sample written), with 2 processes; goal >= 300/s on 2 cores.
"""
from __future__ import annotations

import inspect
import math
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image


def _make_folder(root: Path, n: int, size: int = 256, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth-ish content (like photos), not white noise: JPEG sizes stay realistic
        base = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _open_clip_pair_loader(urls: str, num_samples: int, batch_size: int, preprocess, tokenizer):
    """open_clip_train.data.get_wds_dataset's training pipeline (not resampled, workers 0), see module doc."""
    import webdataset as wds
    from open_clip_train import data as ocd
    from webdataset.tariterators import tar_file_expander, url_opener

    expander_kw = {"eof_value": None} if "eof_value" in inspect.signature(tar_file_expander).parameters else {}

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, **expander_kw)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    shared_epoch = ocd.SharedEpoch(epoch=0)
    pipeline = [
        wds.SimpleShardList(urls),
        ocd.detshuffle2(bufsize=ocd._SHARD_SHUFFLE_SIZE, initial=ocd._SHARD_SHUFFLE_INITIAL, seed=0,
                        epoch=shared_epoch),
        wds.split_by_node, wds.split_by_worker,
        tarfile_to_samples_nothrow,
        wds.shuffle(bufsize=ocd._SAMPLE_SHUFFLE_SIZE, initial=ocd._SAMPLE_SHUFFLE_INITIAL),
        wds.select(ocd.filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=ocd.log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    ]
    dataset = wds.DataPipeline(*pipeline).with_epoch(math.ceil(num_samples / batch_size))
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=0)


def _samples_per_second(loader, key) -> tuple[float, float]:
    """(per CPU-second, per wall-second); in-process readers, so CPU time is what they cost, whatever else runs."""
    cpu, wall, n = time.process_time(), time.perf_counter(), 0
    for batch in loader:
        n += len(batch[key] if isinstance(batch, dict) else batch[0])
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def bench_reader(quick: bool) -> dict:
    import open_clip
    import torch

    from open_clip_po.data import get_po_data
    from open_clip_po.data.typographic import build_typographic

    torch.set_num_threads(1)
    n, batch_size, repeats = (256, 32, 2) if quick else (1024, 64, 5)
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_typographic(_make_folder(tmp / "img", n), tmp / "shards", image_size=224, max_count=n // 4,
                          quiet=True)
        urls = str(tmp / "shards" / "pref-{000000..000003}.tar")
        args = SimpleNamespace(train_data=urls, batch_size=batch_size, workers=0, seed=0)
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
            ours.append(_samples_per_second(get_po_data(args, (preprocess, None), tokenizer=tokenizer)[
                "train"].dataloader, "images"))
            theirs.append(_samples_per_second(_open_clip_pair_loader(urls, n, batch_size, preprocess, tokenizer),
                                              None))
    ratio = statistics.median(o[0] / t[0] for o, t in zip(ours, theirs))
    wall_ratio = statistics.median(o[1] / t[1] for o, t in zip(ours, theirs))
    return {"name": "triplet reader vs open_clip pair reader (samples per CPU-second, ratio)", "value": ratio,
            "unit": "x", "goal": ">= 0.9", "met": ratio >= 0.9,
            "details": f"{n} samples 224 px JPEG in 4 shards (10 classes: captions repeat, as in PO data; ours "
                       f"memoises caption tokens), batch {batch_size}, workers 0, 1 torch thread; median of "
                       f"{repeats}: ours {statistics.median(o[0] for o in ours):.0f}/CPU-s, open_clip "
                       f"{statistics.median(t[0] for t in theirs):.0f}/CPU-s; wall-clock ratio {wall_ratio:.2f}"}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the builder's worker pool)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_typographic(quick: bool) -> list[dict]:
    from open_clip_po.data.typographic import build_typographic

    n, repeats = (200, 1) if quick else (600, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = _make_folder(tmp / "img", n)
        for workers in (2, 0):
            rates, cpu_rates = [], []
            for r in range(repeats):
                cpu0, start = _cpu_seconds(), time.perf_counter()
                build_typographic(images, tmp / f"out{workers}_{r}", image_size=224, quiet=True, workers=workers)
                rates.append(n / (time.perf_counter() - start))
                cpu_rates.append(n / (_cpu_seconds() - cpu0))
            rate = statistics.median(rates)
            rows.append({
                "name": f"typographic building at 224 px, {workers or 'no'} worker processes", "value": rate,
                "unit": "images/s", "goal": ">= 300 (2 cores)" if workers == 2 else "",
                "met": (rate >= 300) if workers == 2 else None,
                "details": f"{n} source images 256 px JPEG, 1 attacked + 1 clean sample each, JPEG q95, "
                           f"median of {repeats}: {', '.join(f'{x:.0f}' for x in rates)}; per CPU-second "
                           f"(all processes, unaffected by other load): {statistics.median(cpu_rates):.0f}"})
    return rows


def run(quick: bool = False) -> list[dict]:
    return [bench_reader(quick), *bench_typographic(quick)]


if __name__ == "__main__":
    import json
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
