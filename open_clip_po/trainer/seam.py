"""``torchrun -m open_clip_po.main --po-loss dpo [open_clip flags]``: open_clip's own trainer, with PO.

This is the one module that patches open_clip. Inside ``patched_open_clip_train()`` it replaces module
globals of ``open_clip_train.main`` — ``parse_args``, ``create_model_and_transforms``, ``get_data``,
``create_loss``, ``train_one_epoch``, ``evaluate``, ``pt_load`` and ``torch`` (a thin proxy whose ``save`` writes
our checkpoint keys atomically and whose DDP works on CPU) — and restores every one of them on exit, also on
errors. Everything else (logging, checkpoints, resume, precision, schedulers, locking, zero-shot eval,
tensorboard/wandb) is open_clip's code, untouched.

``POSession`` only coordinates; each job has its own part: flags (``cli``), policy and reference
(``model_setup``), what happens around steps and epochs (``hooks``), evaluation (``evaluator``), the
checkpoint format (``checkpoint.CheckpointCodec``), which checkpoint ``--resume`` takes (``resume``) and how a run
that must stop says why (``failures``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import types

import open_clip_train.data as ocd
import open_clip_train.main as ocm
import torch

import open_clip_po  # noqa: F401  (registers po-tiny / po-small)

from ..atomic import remove_stale_temp_files
from ..checkpoint import CheckpointCodec, CheckpointError, atomic_save, load_checkpoint
from ..criterion import POCriterion, POSettings
from ..data import get_po_data
from ..data.classnames import read_classnames as read
from ..data.errors import ClassnamesError, DataError
from ..flags import po_argument_parser
from .cli import UsageError, build_objective, parse_po_args
from .console import ConsoleSetup, print_help
from .epoch import train_one_epoch as po_train_one_epoch
from .evaluator import Evaluator
from .failures import one_line, tell_launcher
from .hooks import TrainingHooks
from .model_setup import ModelSetup
from .options import plain_clip_run
from .resume import latest_training_checkpoint, not_training_reason
from .seeding import SEEDED_DATA_GLOBALS, seeded_open_clip_data


class _Proxy(types.ModuleType):
    """A module that is ``target`` except for a few attributes."""

    def __init__(self, target, **overrides):
        super().__init__(target.__name__)
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._target, name)


def read_classnames(path) -> list[str]:
    try:
        return read(path)
    except ClassnamesError as e:
        raise UsageError(f"--po-classnames: {e}") from e


# The globals of open_clip_train.main a PO run replaces, each by the session's attribute of the same name.
PATCHED = ("parse_args", "create_model_and_transforms", "get_data", "create_loss", "train_one_epoch", "evaluate",
           "pt_load", "torch", "setup_logging", "get_latest_checkpoint")
# A plain CLIP run (no --po-* flag): only the flags (--logs-dir), the text tower over the caption span, CPU DDP,
# atomic saves, the console and --resume latest passing over files that are not training checkpoints.
PLAIN_PATCHED = ("parse_args", "create_model_and_transforms", "torch", "setup_logging", "get_latest_checkpoint")


class POSession:
    """One ``main`` call's parts, wired to the names open_clip's trainer calls."""

    def __init__(self, originals: dict, plain: bool = False):
        self.orig = originals
        self.args = None
        self.setup = ModelSetup(lambda: self.args, originals["create_model_and_transforms"], plain=plain)
        self.create_model_and_transforms = self.setup.create_model_and_transforms
        self.torch = self._torch_proxy()
        self.hooks = self.evaluator = self.codec = None
        self.tokenizer = None
        self.console = ConsoleSetup(lambda: self.args, originals["setup_logging"])  # rank 0's lines, the summary
        self.setup_logging = self.console.setup_logging

    @property
    def reference(self):
        return self.setup.reference

    def parse_args(self, argv):
        args = self.args = parse_po_args(argv, self.orig["parse_args"])
        self.codec = CheckpointCodec(linear_head=args.po_linear_head, head_towers=args.po_head_towers,
                                     head_param=args.po_head_param)
        self.hooks = TrainingHooks(args, self.setup, self.save_checkpoint)
        self.evaluator = Evaluator(args, self.setup, self.hooks, self.orig["evaluate"])
        return args

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        self.tokenizer = self.evaluator.tokenizer = tokenizer
        train_data = args.train_data
        args.train_data = None  # open_clip builds only the eval sets; the triplet stream is ours
        try:
            data = self.orig["get_data"](args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        finally:
            args.train_data = train_data
        try:
            data.update(get_po_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer))
        except DataError as e:
            raise UsageError(str(e)) from None
        self.hooks.ledger.watch(data["train"].dataloader)  # skips that no batch carried reach the summary too
        return data

    def create_loss(self, args):
        prompts = None
        if args.po_candidates == "classes":
            names = read_classnames(args.po_classnames)
            prompts = self.tokenizer([args.po_template.format(n) for n in names])
        settings = POSettings(reg_lambda=args.po_reg_lambda, reg_direction=args.po_reg_kl,
                              candidates=args.po_candidates, kto_kl=args.po_kto_kl,
                              distributed=bool(args.distributed), head_reverse_lambda=args.po_head_reverse_lambda)
        criterion = POCriterion(build_objective(args), self.setup.reference, settings, prompt_tokens=prompts)
        self.hooks.objective = criterion.objective
        if self.hooks.resume is not None and self.hooks.resume.objective is not None:
            criterion.objective.load_state_dict(self.hooks.resume.objective)  # e.g. BCO's running baseline
        return criterion.to(args.device)

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None):
        po_train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                           tb_writer=tb_writer, hooks=self.hooks)
        if args.po_eval_images and not any(k in data for k in ("val", "imagenet-val", "imagenet-v2")):
            self.evaluator.evaluate_po(epoch + 1, tb_writer)  # open_clip calls evaluate only with val sets

    def evaluate(self, *a, **kw):
        return self.evaluator.evaluate(*a, **kw)

    def save_checkpoint(self, obj, path, *a, **kw):
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = self.codec.encode(obj, averager=self.hooks.averager, reference=self.hooks.reference_state(),
                                    rng=self.hooks.rng_states, objective=self.hooks.objective_state())
        remove_stale_temp_files(os.path.dirname(os.path.abspath(path)))  # of earlier writers that were killed
        return atomic_save(obj, path)

    def pt_load(self, path, map_location=None):
        remote = "://" in str(path)
        try:
            ckpt = self.orig["pt_load"](path, map_location=map_location) if remote else load_checkpoint(path)
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from e
        reason = not_training_reason(ckpt)
        if reason is not None:
            raise UsageError(f"--resume {path} is not a training checkpoint: {reason}; to start from its weights, "
                             "give it as --pretrained")
        if "epoch" not in ckpt:
            return ckpt["state_dict"] if set(ckpt) == {"state_dict"} else ckpt
        try:
            ckpt, self.hooks.resume = self.codec.decode(ckpt, path, distributed=self.args.distributed)
        except CheckpointError as e:
            raise UsageError(str(e)) from e
        if self.hooks.resume.reference is not None:
            self.setup.reference.load_state_dict(self.hooks.resume.reference)
        if self.hooks.resume.average is None and self.args.po_average != "none":
            logging.warning(f"{path} has no averaged weights; averaging restarts from the resumed weights")
        return ckpt

    def get_latest_checkpoint(self, path, remote):
        return latest_training_checkpoint(path, remote, self.orig["get_latest_checkpoint"])

    def _torch_proxy(self):
        parallel = _Proxy(torch.nn.parallel, DistributedDataParallel=self.setup.ddp)
        return _Proxy(torch, save=self.save_checkpoint, nn=_Proxy(torch.nn, parallel=parallel))


@contextlib.contextmanager
def patched_open_clip_train(plain: bool = False):
    """Patch ``open_clip_train.main`` (and the shuffles of ``.data``) for one run; every original is back on exit."""

    originals = {name: getattr(ocm, name) for name in PATCHED}
    data_originals = {name: getattr(ocd, name) for name in SEEDED_DATA_GLOBALS}
    session = POSession(originals, plain=plain)
    session.console.hold()
    try:
        for name in PLAIN_PATCHED if plain else PATCHED:
            setattr(ocm, name, getattr(session, name))
        for name, value in seeded_open_clip_data(lambda: session.args).items():
            setattr(ocd, name, value)
        yield session
    finally:
        session.console.release()
        for name, value in originals.items():
            setattr(ocm, name, value)
        for name, value in data_originals.items():
            setattr(ocd, name, value)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return 0
    plain = plain_clip_run(po_argument_parser().parse_known_args(argv)[0], po_argument_parser())
    with patched_open_clip_train(plain=plain) as session:
        try:
            status = ocm.main(argv)
        except UsageError as e:
            tell_launcher(str(e.code))
            raise
        except Exception as e:
            message = one_line(e, session.args)
            if message is None:
                raise
            tell_launcher(str(UsageError(message).code))
            raise UsageError(message) from e
    return 0 if status in (None, 0) else 1

