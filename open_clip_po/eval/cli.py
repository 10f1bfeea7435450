"""The evaluation command line: ``python -m open_clip_po.eval zeroshot|tsweep|gender|kl`` (and the sweep's
``pareto``, added by the entry ``open_clip_po.eval.__main__``).

Each subcommand writes a JSON (and CSV where there are rows) plus PNG plots beside it; ``--help``
on each says which. Errors in the input end the run with one line on stderr and exit status 2.
``run(argv)`` runs one subcommand in this process and returns the JSON it wrote (the sweep's and the demos'
evaluations go through it, so a run is evaluated exactly as a user would evaluate it by hand).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterable

import open_clip_po  # noqa: F401  (registers po-tiny / po-small)
from open_clip_po.atomic import DiskFullError
from open_clip_po.checkpoint import WEIGHT_CHOICES, CheckpointError
from open_clip_po.flags import negative_values_as_one_token

from .errors import EvalError
from .gender import DEFAULT_CAPTION, DEFAULT_NEUTRAL, run_gender
from .kl import run_kl
from .templates import TEMPLATE_FAMILIES
from .tsweep import run_tsweep
from .zeroshot import run_zeroshot

PROG = "python -m open_clip_po.eval"
# The attacked copy's file names, as open_clip_po.data.typographic --eval-out writes them (tests check the two agree).
ATTACKED_FILE_NAME = "<stem>_true<T>_written<W>.png"


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _add_model_args(p, pretrained_help="checkpoint file (open_clip_po or stock open_clip) or open_clip pretrained tag",
                    multiple=False):
    if not multiple:  # kl names its bars with --label, one per checkpoint
        p.add_argument("--label", default=None,
                       help="the model's name in plot titles (default: the run's name, NAME of "
                            "LOGS/NAME/checkpoints/epoch_N.pt, else the file's name)")
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32 or po-tiny")
    if multiple:
        p.add_argument("--pretrained", required=True, nargs="+", help=pretrained_help)
    else:
        p.add_argument("--pretrained", required=True, help=pretrained_help)
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="raw",
                   help="raw weights or the checkpoint's bma/ema average (default: raw)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default: %(default)s)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--workers", type=_int_at_least(0), default=2, help="DataLoader workers (default: 2)")


def _add_data_args(p, attacks=True):
    p.add_argument("--images", required=True,
                   help="clean images: a folder of class folders, or WebDataset shards (.tar, {000..009} brace "
                        "spec or a folder of .tar) with a cls or json{'label'} entry")
    p.add_argument("--classnames", default=None,
                   help="file with one class name per line (in sorted class-folder / class-index order); default: "
                        "folder names with _ as space, or classnames.txt beside shards")
    p.add_argument("--dataset-name", default=None, help="name recorded in the JSON (default: the folder's name)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--template", action="append", default=None,
                       help="prompt template with {} for the class name; repeat for an ensemble")
    group.add_argument("--templates-for", choices=list(TEMPLATE_FAMILIES), default=None,
                       help="templates of a dataset family (Defense-Prefix's); default: generic 'a photo of a {}.'")
    if attacks:
        attack = p.add_mutually_exclusive_group()
        attack.add_argument("--typographic", default=None,
                            help="attacked copy of --images: the same class folders, each file named "
                                 f"{ATTACKED_FILE_NAME} (T = true, W = written class index), as open_clip_po.data."
                                 "typographic --eval-out writes it; or shards whose json has 'written'")
        attack.add_argument("--attack-on-the-fly", action="store_true",
                            help="attack --images while reading (open_clip_po.data.typographic.render_attack)")
        p.add_argument("--seed", type=int, default=0, help="seed of the on-the-fly attack (default: 0)")


class EvalCommandFailed(RuntimeError):
    """A subcommand run by ``run`` failed; the message names the command and its last error line."""


def build_parser(extra: Iterable[Callable] = ()) -> argparse.ArgumentParser:
    """The parser; each of ``extra`` adds a subcommand to the subparsers it is given (with ``set_defaults(run=)``)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("zeroshot", help="top-1 on clean and attacked images and the written-class rate",
                       description="Zero-shot top-1 on clean and typographically attacked images and the rate of "
                                   "predicting the written class. Writes OUTPUT (JSON: dataset, model, pretrained, "
                                   "task, metrics{}) and OUTPUT with .png (bar chart).")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--output", default="zeroshot.json", help="JSON path; the PNG goes beside it (default: %(default)s)")
    p.set_defaults(run=run_zeroshot)

    p = sub.add_parser("tsweep", aliases=["sweep"],
                       help="accuracy and written-class rate over t for a head checkpoint (Fig. 2)",
                       description="Evaluate a linear-head checkpoint at W_t = U Σ^t Vᵀ (I + t (W − I) for a head "
                                   "on the image tower only) for each t (no files "
                                   "written per t). Writes OUTPUT (JSON), OUTPUT .csv and OUTPUT .png (clean and "
                                   "attacked top-1 and the written-class rate vs t, and attacked top-1 against the "
                                   "written-class rate).")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--t", default="-4:4:0.5", help="start:stop:step (stop included) or a comma list "
                                                   "(default: %(default)s)")
    p.add_argument("--output", default="tsweep.json", help="JSON path (default: %(default)s)")
    p.set_defaults(run=run_tsweep)

    p = sub.add_parser("gender", help="P(man)/P(woman) over t, the neutral t*, retrieval mix (Fig. 3, 4)",
                       description="For a linear-head checkpoint trained to flip gender: per image P(man) vs "
                                   "P(woman) over t, the crossing t* (linear interpolation), activity accuracy with "
                                   "androgynous captions, and men/women among the top-k retrieved images at t = 0, "
                                   "t*, 1. Writes OUTPUT (JSON), OUTPUT .csv (curves), OUTPUT_images.csv, "
                                   "OUTPUT .png, OUTPUT_retrieval.png and OUTPUT_lean.png.")
    _add_model_args(p)
    p.add_argument("--csv", required=True, help="CSV with a header: image (path, relative to the CSV), gender "
                                                "(man/woman or male/female), activity")
    p.add_argument("--t", default="0:1:0.05", help="grid of t (default: %(default)s)")
    p.add_argument("--images-root", default=None,
                   help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    p.add_argument("--caption", default=DEFAULT_CAPTION,
                   help="gendered caption; {gender} becomes man/woman; the same as the gender shards' --template "
                        "(default: %(default)s)")
    p.add_argument("--neutral-caption", default=DEFAULT_NEUTRAL,
                   help="androgynous caption for activity accuracy and the default retrieval prompts "
                        "(default: %(default)s)")
    p.add_argument("--retrieval-prompt", action="append", default=None,
                   help="retrieval prompt, e.g. 'an image of a police'; repeatable (default: the neutral captions)")
    p.add_argument("--top-k", type=_int_at_least(1), default=10,
                   help="retrieved images per prompt (default: %(default)s)")
    p.add_argument("--output", default="gender.json", help="JSON path (default: %(default)s)")
    p.set_defaults(run=run_gender)

    p = sub.add_parser("kl", help="mean KL(π_θ‖π_ref) on clean images (Fig. 5)",
                       description="Mean KL between the checkpoint's and the reference's policies over the class "
                                   "prompts on clean images. Several --pretrained give one bar each. Writes OUTPUT "
                                   "(JSON) and OUTPUT .png.")
    _add_model_args(p, "one or more checkpoints (or pretrained tags) to compare with the reference", multiple=True)
    _add_data_args(p, attacks=False)
    p.add_argument("--ref-pretrained", default=None,
                   help="reference checkpoint or pretrained tag; default for head checkpoints: their own backbone")
    p.add_argument("--label", action="append", default=None, help="bar label per --pretrained (default: file stem)")
    p.add_argument("--direction", choices=("forward", "reverse"), default="forward",
                   help="forward: KL(π_θ‖π_ref), the paper's; reverse: KL(π_ref‖π_θ) (default: %(default)s)")
    p.add_argument("--output", default="kl.json", help="JSON path (default: %(default)s)")
    p.set_defaults(run=run_kl)

    for add in extra:
        add(sub)
    return parser


def main(argv=None, extra: Iterable[Callable] = ()) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(extra).parse_args(negative_values_as_one_token(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.run(args)
    except (EvalError, CheckpointError, DiskFullError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]) -> dict:
    """``python -m open_clip_po.eval ARGV`` in this process (no start-up per evaluation); returns the JSON it wrote
    (``--output``). A failure is ``EvalCommandFailed`` naming the command and its last error line."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(argv)
    sys.stderr.write(errors.getvalue())
    if code:
        last = errors.getvalue().strip().splitlines()
        command = shlex.join([sys.executable, "-m", "open_clip_po.eval", *argv])
        raise EvalCommandFailed(f"{command} failed (exit {code}): {last[-1] if last else 'no message'}")
    return json.loads(Path(argv[argv.index("--output") + 1]).read_text(encoding="utf-8"))
