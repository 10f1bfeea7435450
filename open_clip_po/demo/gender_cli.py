"""``python -m open_clip_po.demo gender``: the paper's second experiment (Sec. 4.2, Figs. 3-4) in a small world.

    python -m open_clip_po.demo gender [--out DIR] [--quick]     (also: bash scripts/run.sh demo gender ...)

1. builds a world of people doing activities: men (short hair, trousers) and women (long hair, a dress) doing one of
   six activities shown by drawn objects, on varied backgrounds, captioned "The man/woman is <activity>" with the
   activities unevenly split between genders (as web data is), the object out of frame in 30 % of the
   pre-training images (gender is then the only hint of the activity; --hidden-share) and no caption saying
   "The person is <activity>" (--neutral-share adds them: their lean is then the image tower's, which the flip
   misses — README, "The gender demo");
2. pre-trains ``po-small`` on it with open_clip's own trainer (``open_clip_train.main``, launched as
   ``python -m open_clip_po.main`` so that its shuffles follow ``--seed``), so it reads gender and is biased in
   retrieval;
3. writes a CSV of the training images (image, gender, activity) and runs ``python -m open_clip_po.data.gender`` on
   it (y_w = the flipped-gender caption, y_l = the original, D_reg = "The person is <activity>");
4. trains linear heads at the paper's β = λ = 1 through ``torchrun -m open_clip_po.main --po-linear-head``
   (2 processes): with DPO, IPO and KTO a head on the image tower (``--po-head-towers image``, similarity
   (Wx)ᵀy), and with DPO the paper's head on both towers (xᵀWᵀWy), which on this world erases gender instead of
   reversing it — its form cannot reverse a direction that pre-training made near-parallel in the two towers;
5. measures with ``python -m open_clip_po.eval gender`` over t ∈ [-2, 2] (W_t = exp(tA) for the default log heads,
   W = exp(A); with ``--head-param dense`` I + t(W − I) for the image head and UΣ^tVᵀ for the paper's) on balanced
   held-out images: the own-gender probability falls with t, flips at t = 1, crosses 1/2 at a neutral t*, while activity
   accuracy stays; retrieval's gender mix at t = 0, t*, 1 and each prompt's lean over t; folds W_t at t = 1 and t* into stock checkpoints with
   ``python -m open_clip_po.svd_scale``; writes ``DIR/report.md``, ``report.json``, ``flip.png``
   (Fig. 3) and ``retrieval.png`` (Fig. 4). Every command is logged in ``DIR/commands.txt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..atomic import DiskFullError
from .gender_run import GenderConfig, full_gender_config, gender_methods, quick_gender_config, run_gender_demo
from .pipeline import StageError, pretrained_path, setup_logging
from .progress import interrupted_line

PROG = "python -m open_clip_po.demo gender"


def build_gender_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_gender_out", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller world, shorter pre-training, DPO's image head only, t on a coarse grid: for CI")
    p.add_argument("--pretrained", default=None,
                   help="skip pre-training and start from this po-small checkpoint (e.g. DIR/runs/pretrain-people/"
                        "checkpoints/epoch_N.pt of an earlier run)")
    p.add_argument("--methods", default=None,
                   help="comma-separated objectives for the image-tower head (default: dpo,ipo,kto; --quick: dpo)")
    p.add_argument("--paper-methods", default=None,
                   help="comma-separated objectives for the paper's two-tower head, or 'none' (default: dpo; "
                        "--quick: none)")
    p.add_argument("--t", default=None,
                   help=f"grid of t for the evaluation, start:stop:step (default: {GenderConfig().t_grid})")
    p.add_argument("--neutral-share", type=_share, default=None,
                   help="share of pre-training captions \"The person is <activity>\" (default: "
                        f"{GenderConfig().neutral_share:g})")
    p.add_argument("--hidden-share", type=_share, default=None,
                   help="share of pre-training images with the activity's object out of frame (default: "
                        f"{GenderConfig().hidden_share:g})")
    p.add_argument("--head-param", choices=("log", "dense"), default=None,
                   help="how the heads learn W (--po-head-param): log = W = exp(A), dense = W itself (default: the "
                        "trainer's, log on both towers and dense on the image tower)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every run (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the subprocesses (default: the environment's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:   # NaN fails too
        raise argparse.ArgumentTypeError(f"a share must be a number in [0, 1], got {text!r}")
    return value


def gender_main(argv) -> int:
    args = build_gender_parser().parse_args(argv)
    setup_logging()
    cfg = quick_gender_config() if args.quick else full_gender_config()
    cfg = dataclasses.replace(cfg, seed=args.seed, t_grid=args.t or cfg.t_grid, head_param=args.head_param)
    shares = {"neutral_share": args.neutral_share, "hidden_share": args.hidden_share}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in shares.items() if v is not None})
    if args.methods is not None or args.paper_methods is not None:
        defaults = {"--methods": [m.loss for m in cfg.methods if "--po-head-towers" in m.flags],
                    "--paper-methods": [m.loss for m in cfg.methods if "--po-head-towers" not in m.flags]}
        chosen = {}
        for flag, spec in (("--methods", args.methods), ("--paper-methods", args.paper_methods)):
            chosen[flag] = defaults[flag] if spec is None else [m.strip() for m in spec.split(",")
                                                                 if m.strip() not in ("", "none")]
            unknown = [m for m in chosen[flag] if m not in ("dpo", "ipo", "kto")]
            if unknown:
                print(f"{PROG}: error: unknown {flag} {', '.join(unknown)} (known: dpo, ipo, kto)", file=sys.stderr)
                return 2
        if not any(chosen.values()):
            print(f"{PROG}: error: no head to train (--methods and --paper-methods are both empty)", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, methods=gender_methods(chosen["--methods"], chosen["--paper-methods"]))
    pretrained = pretrained_path(args.pretrained, PROG)
    out = Path(args.out).resolve()
    try:
        report = run_gender_demo(cfg, out, pretrained=pretrained, quiet=args.quiet, threads=args.threads)
    except (StageError, DiskFullError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(interrupted_line(PROG, e), file=sys.stderr)
        return 130
    met = {m: all(v for k, v in t.items() if isinstance(v, bool)) for m, t in report["targets"].items()}
    claim = ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in met.items()) or "no runs"
    if "quick_targets" in report:
        check = ", ".join(f"{m} {'met' if q['met'] else 'not met'}" for m, q in report["quick_targets"].items())
        print(f"report: {out / 'report.md'} (pipeline check: {check or 'no runs'}; the full demo's claim, not "
              f"expected of --quick, all targets met: {claim})")
    else:
        print(f"report: {out / 'report.md'} (all targets met: {claim})")
    return 0
