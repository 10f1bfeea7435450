"""The demos: small synthetic worlds in which the paper's two experiments run end to end on a CPU.

    python -m open_clip_po.demo [--out DIR] [--quick]          typographic attacks (the default)
    python -m open_clip_po.demo gender [--out DIR] [--quick]   flipping gender with a linear head (--help for more)
    (also: bash scripts/run.sh demo [gender] ..., open-clip-po-demo)

The typographic demo, in which preference optimisation removes a typographic vulnerability:

1. builds a world of coloured shapes named by single words, where many images also show their name written on
   them and some show only the word (so a CLIP trained on it learns to read);
2. pre-trains ``po-small`` on its captions with open_clip's own trainer (``open_clip_train.main``, launched as
   ``python -m open_clip_po.main`` so that its shuffles follow ``--seed``), from WebDataset shards written with
   ``open_clip_po.data.shards``, and measures how readily it is fooled by a wrong class name written on an image;
3. writes typographic triplet shards with ``open_clip_po.data.typographic`` and fine-tunes with DPO, IPO, KTO and
   the CE baseline, with and without the linear head, through ``torchrun -m open_clip_po.main`` (2 processes);
4. evaluates with ``open_clip_po.eval`` (clean / attacked accuracy, written-class rate, KL to the reference, the
   t-sweep of the head model) and writes ``DIR/report.md`` and ``DIR/report.json`` with PNG plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..atomic import DiskFullError
from .gender_cli import gender_main
from .pipeline import DemoConfig, Method, StageError, full_config, pretrained_path, quick_config, setup_logging
from .progress import interrupted_line
from .run import run_demo

__all__ = ["main", "DemoConfig", "Method", "full_config", "quick_config"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m open_clip_po.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller world, shorter training, DPO (full and head) and CE only: for CI")
    p.add_argument("--pretrained", default=None,
                   help="skip pre-training and start from this po-small checkpoint (e.g. DIR/runs/pretrain-see/"
                        "checkpoints/epoch_N.pt of an earlier run: the last pre-training stage's)")
    p.add_argument("--pretrain-only", action="store_true",
                   help="stop after pre-training: report the pre-trained model's vulnerability only")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the fine-tuning runs, e.g. dpo,dpo-head,ce (default: all of "
                        "dpo, dpo-head, ipo, ipo-head, kto, kto-head, ce, ce-head; --quick: dpo, dpo-head, ce)")
    p.add_argument("--head-param", choices=("log", "dense"), default=None,
                   help="how the heads learn W (--po-head-param): log = W = exp(A), dense = W itself (default: the "
                        "trainer's, log on both towers and dense on the image tower)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every run (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the subprocesses (default: the environment's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gender"]:
        return gender_main(argv[1:])
    if argv[:1] == ["typographic"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = quick_config() if args.quick else full_config()
    cfg = dataclasses.replace(cfg, seed=args.seed, head_param=args.head_param)
    if args.methods is not None:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = {m.slug: m for m in full_config().methods}
        unknown = [m for m in wanted if m not in known]
        if unknown:
            print(f"open_clip_po.demo: error: unknown --methods {', '.join(unknown)} (known: {', '.join(known)})",
                  file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, methods=tuple(known[m] for m in wanted))
    if args.pretrain_only:
        cfg = dataclasses.replace(cfg, methods=())
    pretrained = pretrained_path(args.pretrained, "open_clip_po.demo")
    out = Path(args.out).resolve()
    try:
        report = run_demo(cfg, out, pretrained=pretrained, quiet=args.quiet, threads=args.threads)
    except (StageError, DiskFullError) as e:
        print(f"open_clip_po.demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(interrupted_line("open_clip_po.demo", e), file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'} ({summary_line(report)})")
    return 0


def summary_line(report: dict) -> str:
    """The verdict the command ends with: a ``--quick`` run's own targets first, the full demo's claim apart."""
    t = report["targets"]
    claim = (f"robustness {'met' if t['robust_met'] else 'not met'}, "
             f"closer to reference than CE {'met' if t['closer_met'] else 'not met'}")
    if "quick_targets" not in report:
        return f"targets: {claim}"
    return (f"pipeline check: {'met' if report['quick_targets']['met'] else 'not met'}; the full demo's claim, "
            f"not expected of --quick: {claim}")
