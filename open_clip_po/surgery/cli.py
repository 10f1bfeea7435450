"""Scale a trained linear head, W_t = U Σ^t Vᵀ (exp(t A) for a log-parameterised head W = exp(A); I + t (W − I) for
a dense head on the image tower only), and fold it into a stock checkpoint.

    python -m open_clip_po.svd_scale CKPT --t T [--out PATH] [--weights {raw,bma,ema}]
                                     [--fold | --keep-head] [--report]

t = 1 is the trained head, t = 0 the base model's similarities, t > 1 strengthens and t < 0 reverses
what the head learned (paper Sec. 3.4). By default W_t is folded into the towers' projections and the
result is a stock open_clip checkpoint (``{"epoch", "name", "state_dict"}``, no optimizer state) that
``open_clip.create_model_and_transforms(MODEL, pretrained=OUT)`` loads without this package.
The default output is CKPT's name with ``.t{T}`` before the suffix (``epoch_3.pt --t -2`` →
``epoch_3.t-2.pt``; ``.bma``/``.ema`` and ``.head`` are added for --weights and --keep-head), beside CKPT — or,
for a training checkpoint in a run's ``checkpoints/`` folder, in the run's ``svd_scale/`` folder, where
``--resume latest`` does not look.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..checkpoint import (AVERAGE_KEY, HEAD_KEY, HEAD_NOTE, HEAD_NOTE_KEY, WEIGHT_CHOICES, CheckpointError,
                          atomic_save, head_entry, head_generator, head_towers, load_checkpoint,
                          model_weights)
from ..flags import negative_values_as_one_token
from . import SurgeryError, embedding_dim, fold_head, head_model_at, scale_head
from .report import build_report, format_report, plot_report, write_report_json

__all__ = ["scale_head", "fold_head", "head_model_at", "SurgeryError", "default_output_path", "main"]

PROG = "open-clip-po-svd-scale"
SCALED_FOLDER = "svd_scale"  # beside a run's checkpoints/ folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by open_clip_po.main (with a head)")
    parser.add_argument("--t", type=float, required=True,
                        help="power applied to the singular values (W_t = exp(t A) for a log-parameterised head); for "
                             "a dense head on the image tower only, the step along I + t (W − I) (negative values "
                             "need no quoting: --t -2)")
    parser.add_argument("--out", default=None, help="output checkpoint (default: derived from CKPT and t); "
                                                     "never the input itself")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="raw",
                        help="which weights of CKPT: raw, or the bma/ema average (default: raw)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fold", dest="keep_head", action="store_false",
                      help="fold W_t into the projections: a stock open_clip checkpoint (default)")
    mode.add_argument("--keep-head", dest="keep_head", action="store_true",
                      help="keep the stock weights and store W_t as the head (po_head) instead")
    parser.set_defaults(keep_head=False)  # else --fold's store_false would make True the default
    parser.add_argument("--report", action="store_true",
                        help="print and write OUT-stem.report.json and .report.png (WᵀW, its residual, "
                             "singular values of W and W_t)")
    return parser


def default_output_path(checkpoint: str | os.PathLike, t: float, weights: str = "raw",
                        keep_head: bool = False) -> Path:
    """``dir/epoch_3.pt`` → ``dir/epoch_3[.bma].t-2[.head].pt``; ``RUN/checkpoints/epoch_3.pt`` →
    ``RUN/svd_scale/epoch_3.t-2.pt``.

    Not in ``checkpoints/``: open_clip's ``--resume latest`` takes the last ``*.pt`` it finds there (and in any
    folder whose name starts with "checkpoints"), and ``epoch_3.t-2.pt`` sorts after ``epoch_3.pt``.
    """
    path = Path(checkpoint)
    tags = ([weights] if weights != "raw" else []) + [f"t{float(t):g}"] + (["head"] if keep_head else [])
    folder = path.parent.parent / SCALED_FOLDER if path.parent.name == "checkpoints" else path.parent
    return folder / f"{path.stem}.{'.'.join(tags)}{path.suffix or '.pt'}"


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def run(args: argparse.Namespace) -> Path:
    """Do the surgery described by parsed ``args``; return the output path. Raises CheckpointError."""
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else default_output_path(source, args.t, args.weights, args.keep_head)
    if source.exists() and _same_file(source, out):
        raise SurgeryError(f"refusing to overwrite the input checkpoint {source} (choose another --out)")
    if out.is_dir():
        raise SurgeryError(f"--out {out} is a directory; give a file name")
    checkpoint = load_checkpoint(source)
    state_dict, W = model_weights(checkpoint, args.weights, str(source))
    if W is None:
        where = f"{AVERAGE_KEY}.{HEAD_KEY}" if args.weights != "raw" else HEAD_KEY
        raise SurgeryError(f"{source} has no linear head ({where}); train with --po-linear-head")
    towers = head_towers(checkpoint, args.weights, str(source))
    log = head_generator(checkpoint, args.weights, str(source))
    W_t = scale_head(W, args.t, towers, log)

    result = {key: checkpoint[key] for key in ("epoch", "name") if key in checkpoint}
    if args.keep_head:
        dim = embedding_dim(state_dict)  # None for towers we cannot read; the head still checks at load
        if dim is not None and W_t.shape[0] != dim:
            raise SurgeryError(f"the head W is {W_t.shape[0]}x{W_t.shape[1]} but the model's embedding "
                               f"dimension is {dim}")
        result["state_dict"] = state_dict
        # a log head stays one: W_t = exp(t A) has the generator t A, so scaling the output again composes exactly
        result[HEAD_KEY] = head_entry(W_t, towers, None if log is None else args.t * log)
        result[HEAD_NOTE_KEY] = HEAD_NOTE
    else:
        result["state_dict"] = fold_head(state_dict, W_t, towers)
    # Optimizer state and averages belong to the training run, not to the edited model.
    result["po_svd_scale"] = {"t": float(args.t), "weights": args.weights, "folded": not args.keep_head,
                              "towers": towers, "param": "dense" if log is None else "log", "source": str(source)}
    from .. import __version__

    result["po_version"] = __version__
    atomic_save(result, out)
    print(f"wrote {out} (t = {args.t:g}, {args.weights} weights, head on {towers} tower(s), "
          f"{'head kept as po_head' if args.keep_head else 'head folded into the projections'})")

    if args.report:

        report = build_report(W, W_t, args.t, source=str(source), output=str(out), weights=args.weights,
                              towers=towers, param="dense" if log is None else "log")
        stem = out.with_name(out.name[: -len(out.suffix)] if out.suffix else out.name)
        json_path, png_path = Path(f"{stem}.report.json"), Path(f"{stem}.report.png")
        report["png"] = str(png_path)
        print(format_report(report))
        write_report_json(report, json_path)
        plot_report({"W": W, f"W_t (t={args.t:g})": W_t}, png_path)
        print(f"wrote {json_path} and {png_path}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(negative_values_as_one_token(list(sys.argv[1:] if argv is None else argv)))
    try:
        run(args)
    except CheckpointError as e:  # SurgeryError included: one line for the user, no traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # cannot write the output (permissions, full disk, ...)
        print(f"{PROG}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0

