"""What the shard builders share: ordered (optionally parallel) per-sample work with a progress bar."""
from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from ..atomic import write_text


def ordered_map(fn: Callable, items: Sequence, workers: int = 0, desc: str = "", quiet: bool = False,
                chunksize: int = 16) -> Iterator:
    """``map(fn, items)`` in input order (so output is deterministic), in ``workers`` processes if > 0."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=quiet, mininterval=1.0)
    try:
        if workers and workers > 0:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                for result in pool.imap(fn, items, chunksize=chunksize):
                    bar.update(1)
                    yield result
        else:
            for item in items:
                result = fn(item)
                bar.update(1)
                yield result
    finally:
        bar.close()


def write_lines(path, lines: Iterable[str]) -> None:
    write_text(path, "".join(line + "\n" for line in lines))
