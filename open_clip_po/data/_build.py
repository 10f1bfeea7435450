"""What the shard builders share: their command-line options, captions from templates, and ordered
(optionally parallel) per-sample work with a progress bar."""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import sys
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from ..atomic import DiskFullError, write_text


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


def format_caption(template: str, **fields) -> str:
    try:
        return template.format(*fields.values()) if "{}" in template else template.format(**fields)
    except (IndexError, KeyError) as exn:
        raise ValueError(f"caption template {template!r} needs a field we do not have ({exn}); "
                         f"available: {sorted(fields)}") from None


def builder_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_writer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sharding")
    g.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    g.add_argument("--max-size", type=float, default=3.0, help="shard size limit in GB (default 3)")
    g.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"],
                   help="encoding of written images (default jpg)")
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    g.add_argument("--seed", type=int, default=0, help="same seed and inputs give byte-identical shards")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--workers", type=int, default=0, help="encoding processes (default 0 = in-process)")


def writer_kwargs(args) -> dict:
    """The keyword arguments every builder function takes, from the options of ``add_writer_args``."""
    return dict(max_count=args.max_count, max_size=int(args.max_size * (1 << 30)), image_format=args.image_format,
                quality=args.quality, seed=args.seed, workers=args.workers, quiet=args.quiet)


def run_builder(build: Callable[[], object]) -> int:
    """Run a builder for its ``main``: 0, or 2 with the one-line error of bad input, a locked --out or a full
    disk (the folder then holds its previous set, see ``publish``)."""

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build()
    except (ValueError, DiskFullError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return 0
