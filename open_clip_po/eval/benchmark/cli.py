"""The ``benchmark`` subcommand's options (``python -m open_clip_po.eval benchmark --help``)."""
from __future__ import annotations

import argparse

from open_clip_po.checkpoint import WEIGHT_CHOICES

from ..cli import _int_at_least as int_at_least
from .catalog import CATALOG, GROUPS

DESCRIPTION = """\
The paper's Tables 1 and 2 through CLIP_benchmark (pip install -e '.[benchmark]'): zero-shot top-1 of each
--pretrained (one row each, plus PAINT interpolations) on each data set's original images (O) and, with
--typographic, on a Defense-Prefix typographic copy of the same images (T), with the written-class rate on T and
the average over the data sets; real typographic sets (Table 2) as they are. Data sets are read from
--dataset-root in CLIP_benchmark's webdataset layout (ROOT/wds_<name>/<split>/N.tar, as
`huggingface-cli download clip-benchmark/wds_<name>` writes it) or torchvision's (ROOT/<key>); nothing is
downloaded. Writes OUTPUT/results.json, table1.md/.csv/.png and table2.md/.csv/.png. Under torchrun each
process evaluates a share of the images (gloo on CPU, nccl on CUDA). See docs/eval.md."""


def _float_in_unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def _run(args):
    from .run import run_benchmark  # torch, PIL and clip_benchmark load only when the subcommand runs

    return run_benchmark(args)


def add_parser(sub) -> argparse.ArgumentParser:
    """``python -m open_clip_po.eval benchmark``: added to the eval command line by ``open_clip_po.eval.__main__``."""
    p = sub.add_parser("benchmark", help="Tables 1 and 2: O/T zero-shot top-1 on the standard data sets "
                                         "(CLIP_benchmark)", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    p.add_argument("--pretrained", nargs="+", default=None,
                   help="checkpoint files or open_clip pretrained tags, one table row each (e.g. openai "
                        "logs/dpo/checkpoints/epoch_3.pt); required unless --check-data")
    p.add_argument("--label", action="append", default=None,
                   help="row label per --pretrained, in order (default: RUN/epoch_N, the file stem or the tag)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, nargs="+", default=["raw"],
                   help="raw weights or the checkpoints' bma/ema average: one for all --pretrained or one each "
                        "(pretrained tags and --interpolate: raw) (default: raw)")
    p.add_argument("--interpolate", nargs=2, metavar=("ZERO_SHOT", "FINE_TUNED"), default=None,
                   help="add PAINT rows θ = α θ_zs + (1 − α) θ_ft between two checkpoints or tags")
    p.add_argument("--alpha", type=_float_in_unit, action="append", default=None,
                   help="α of --interpolate, the zero-shot weight; repeat for several rows (default: 0.5)")
    keys = ", ".join(CATALOG)
    p.add_argument("--datasets", default="table1",
                   help=f"comma list of {keys}; or {' / '.join(GROUPS)} for the paper's sets "
                        "(default: table1 = " + ",".join(GROUPS["table1"]) + ")")
    p.add_argument("--dataset-root", required=True,
                   help="folder holding the data sets (CLIP_benchmark's {dataset}/{dataset_cleaned} allowed)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test; ImageNet folders: val)")
    p.add_argument("--typographic", action="store_true",
                   help="also evaluate a Defense-Prefix typographic copy (T) of every Table 1 image")
    p.add_argument("--seed", type=int, default=0, help="seed of the typographic copy (default: 0)")
    p.add_argument("--typographic-fonts", nargs="+", default=None, metavar="FONT",
                   help="TrueType files for the copy (default: DejaVu Sans, Sans Mono, Serif)")
    p.add_argument("--save-typographic", default=None, metavar="DIR",
                   help="write the typographic copies to DIR/wds_<name>/ in CLIP_benchmark's webdataset layout")
    p.add_argument("--templates", choices=("clip_benchmark", "defense-prefix"), default="clip_benchmark",
                   help="per-data-set templates: CLIP_benchmark's, or Defense-Prefix's single ones (the paper's "
                        "protocol) (default: %(default)s)")
    p.add_argument("--template", action="append", default=None,
                   help="template for every data set, with {} or {c} for the class name; repeat for an ensemble")
    p.add_argument("--classnames", default=None, metavar="JSON",
                   help="class names to use instead: JSON mapping a data set (key or CLIP_benchmark name) to its "
                        "list of names, as CLIP_benchmark's --custom_classname_file")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:<local rank> under torchrun)")
    p.add_argument("--amp", action="store_true", help="autocast, as CLIP_benchmark's default (off: fp32)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--workers", type=int_at_least(0), default=2, help="DataLoader workers per process")
    p.add_argument("--output", default="benchmark", help="output folder (default: %(default)s)")
    p.add_argument("--check-data", action="store_true",
                   help="only find every data set (one line each: layout, path, images) and exit; loads no model")
    p.set_defaults(run=_run)
    return p
