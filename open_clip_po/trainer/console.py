"""What ``python -m open_clip_po.main`` tells its user on the console: ``--help``, one start-up summary of what
the run will do, and lines from rank 0 only.

open_clip gives every rank a console handler at INFO level, so under torchrun each of its lines and ours came once
per rank. ``ConsoleSetup.setup_logging`` takes the place of open_clip's ``setup_logging`` (it calls it first): on a
rank other than 0 the console keeps errors only — the log files (``--log-local``) keep everything. Warnings that
flag checking logs before open_clip's handlers exist are held back (``logging.warning`` would otherwise give the
root logger a second console handler, and every later line would print twice) and replayed through them; Python
warnings go through logging for the run, so they too come once.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..flags import po_argument_parser
from .cli import build_objective

PROG = "python -m open_clip_po.main"

DESCRIPTION = f"""\
open_clip's own trainer (open_clip_train.main) with preference optimisation (DPO, IPO, KTO, ...) over image-caption
triplets. One process, or torchrun:

    {PROG} --po-loss dpo --model ViT-B-32 --pretrained openai --train-data SHARDS ...
    torchrun --nproc_per_node 8 -m open_clip_po.main --po-loss dpo ... --logs-dir LOGS

Without --po-loss (and no other --po-* flag) it runs open_clip's plain CLIP training, unchanged but for what it adds
to every run: shuffles seeded from --seed, --logs-dir, checkpoints written atomically, DDP on CPU, and the po-tiny /
po-small model configs registered.
"""

EPILOG = """\
Every open_clip_train flag is accepted as well (--model, --pretrained, --train-data, --batch-size, --epochs, --lr,
--precision, --report-to, ...): python -m open_clip_train.main --help lists them. Under torchrun use --logs-dir, not
--logs (torchrun takes --logs as its own). The console shows rank 0's lines (and any rank's errors).
"""


def print_help(file=None) -> None:
    parser = po_argument_parser(prog=PROG, usage=f"{PROG} [--po-loss OBJECTIVE [--po-* ...]] [open_clip_train flags]",
                                description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.print_help(file)


class _HeldBack(logging.Handler):
    """Holds the records logged before open_clip's handlers exist (by its presence, keeps ``logging.warning`` from
    calling ``basicConfig``)."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class _ErrorsOnly(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.ERROR


class ConsoleSetup:
    """Install with ``hold()`` before flag parsing; ``setup_logging`` replaces open_clip's; ``release()`` on exit."""

    def __init__(self, args_of, open_clip_setup_logging):
        self._args_of, self._setup = args_of, open_clip_setup_logging
        self._held = None
        self._warnings_captured = False

    def hold(self) -> None:
        if not logging.root.handlers:   # a host that configured logging (pytest, a notebook) keeps its own
            self._held = _HeldBack()
            logging.root.addHandler(self._held)
            # Python warnings (open_clip's "Device cuda was not available", once per rank) go the same way
            logging.captureWarnings(True)
            self._warnings_captured = True

    def setup_logging(self, log_file, level, include_host=False):
        self._setup(log_file, level, include_host)
        args = self._args_of()
        if getattr(args, "rank", 0) != 0:
            loggers = [logging.root, *(x for x in logging.root.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger))]   # torch's have consoles of their own
            for handler in {h for x in loggers for h in x.handlers}:
                if not isinstance(handler, (logging.FileHandler, logging.NullHandler)):   # a console
                    handler.addFilter(_ErrorsOnly())
        self._replay(logging.root.handle)
        if getattr(args, "rank", 0) == 0:
            for line in run_summary(args):
                logging.info(line)

    def release(self) -> None:
        """Records still held (the run stopped before open_clip set up logging) go to stderr."""
        if self._warnings_captured:
            logging.captureWarnings(False)
            self._warnings_captured = False
        if self._held is not None:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(levelname)s | %(message)s"))
            self._replay(console.handle)

    def _replay(self, handle) -> None:
        held, self._held = self._held, None
        if held is not None:
            logging.root.removeHandler(held)
            for record in held.records:
                handle(record)


# -- the start-up summary

def _objective_text(args):
    """The objective as the run builds it, in words, and the objective itself."""
    objective = build_objective(args)
    terms = getattr(objective, "terms", None)
    if terms is None:
        terms, weights = {args.po_loss: objective}, None
    else:
        weights = objective.weights

    def one(name, term):
        hparams = term.hparams() if hasattr(term, "hparams") else {}
        return name + (" (" + ", ".join(f"{k}={v}" for k, v in hparams.items()) + ")" if hparams else "")

    parts = [one(name, term) for name, term in terms.items()]
    if weights is not None:
        parts = [f"{w:g} × {p}" for w, p in zip(weights, parts)]
    return " + ".join(parts), objective


def _reference_text(args, objective) -> str:
    if args.po_ref_cache:
        text = f"cached features from {args.po_ref_cache} (python -m open_clip_po.ref_cache); no reference model"
    elif args.po_linear_head:
        text = "the frozen backbone without W (no second model)"
    elif args.po_ref_model or args.po_ref_pretrained:
        text = (f"online: {args.po_ref_model or args.model} from {args.po_ref_pretrained or args.pretrained}, "
                "frozen")
    else:
        text = f"online: a frozen copy of the policy at its start ({args.pretrained or 'random init'})"
    if not objective.requires_reference:
        text += ("; the objective needs none, the regulariser reads it" if args.po_reg_data
                 else "; unused (the objective needs none and there is no regulariser)")
    return text


def run_summary(args) -> list[str]:
    """What this run will do, in a few lines: logged once at start-up (console and out.log)."""
    if getattr(args, "po_loss", None) is None:
        return ["open_clip_po: plain CLIP training (no --po-loss): open_clip's own loss and loop, shuffles seeded "
                "from --seed"]
    objective_text, objective = _objective_text(args)
    policy = (f"a linear head W on the frozen towers of {args.model} ({args.po_head_towers} tower"
              f"{'s' if args.po_head_towers == 'both' else ''})" if args.po_linear_head
              else f"{args.model} fully fine-tuned")
    if args.po_ref_sync_steps:
        sync = (f"every {args.po_ref_sync_steps} optimizer steps, θ_ref ← α θ + (1 − α) θ_ref with "
                f"α = {args.po_ref_sync_alpha:g} (TR-DPO)")
    else:
        sync = "none, the reference stays as it started"
    if args.po_candidates == "classes":
        candidates = f"one prompt per class of {args.po_classnames}, {args.po_template!r}"
    else:
        candidates = "the captions of the global batch"
    regulariser = (f"λ = {args.po_reg_lambda:g} × KL({'π_θ‖π_ref' if args.po_reg_kl == 'forward' else 'π_ref‖π_θ'})"
                   f" on {args.po_reg_data}" if args.po_reg_data else "none (no --po-reg-data)")
    averaging = {"none": "none", "bma": f"BMA, γ = {args.po_bma_gamma:g}",
                 "ema": f"EMA, decay {args.po_ema_decay:g}"}[args.po_average]
    return [f"open_clip_po: preference optimisation of {policy}, starting from {args.pretrained or 'random init'}",
            f"  objective: {objective_text}",
            f"  reference: {_reference_text(args, objective)}",
            f"  reference sync: {sync}",
            f"  candidates: {candidates}",
            f"  regulariser: {regulariser}",
            f"  weight averaging: {averaging}" + (" (saved in each checkpoint)" if args.po_average != "none" else "")]
