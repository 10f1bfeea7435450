"""The trainer's command line: our ``--po-*`` flags (``open_clip_po.flags``) parsed before open_clip's, checked
once, before anything is built.

``parse_po_args(argv, open_clip_parse_args)`` pre-parses ours with ``parse_known_args``, hands the rest to
open_clip's parser and sets our attributes on its namespace (so they land in ``params.txt``).
"""
from __future__ import annotations

import difflib
import logging
import os

import open_clip

from .. import losses as po_losses
from ..flags import REG_LAMBDA_DEFAULT, po_argument_parser
from ..head import default_param
from ..ref_cache import deterministic_augmentation
from .failures import missing_logger
from .options import check_open_clip_options, plain_clip_run

# Flags that only mean something with --po-reg-data: given without it, they would be silently inert.
REG_ONLY_FLAGS = ("po_reg_lambda", "po_reg_kl", "po_reg_batch_size", "po_reg_num_samples", "po_head_reverse_lambda")
MODEL_SCHEMAS = ("hf-hub:", "local-dir:")


class UsageError(SystemExit):
    """A bad flag or combination (or a run that must stop): one line on stderr, exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"open_clip_po.main: error: {message}")


def parse_po_args(argv, open_clip_parse_args):
    ours, rest = po_argument_parser().parse_known_args(argv)
    if ours.logs_dir is not None:
        rest = [*rest, "--logs", ours.logs_dir]
    args = open_clip_parse_args(rest)
    missing = missing_logger(args)
    if missing:  # before open_clip makes the run folder and builds the model
        raise UsageError(missing)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    if "timm" in args.opt and args.eps is None:
        args.eps = 1e-8  # open_clip hands timm eps=None, which torch's Adam-family optimizers reject
    validate(args)
    args.po_reg_lambda = REG_LAMBDA_DEFAULT if args.po_reg_lambda is None else args.po_reg_lambda
    args.po_reg_kl = args.po_reg_kl or "forward"
    args.po_head_towers = args.po_head_towers or "both"
    args.po_head_param = args.po_head_param or default_param(args.po_head_towers)
    if args.po_head_reverse_lambda is None:   # a log head's reversed side is held like its trained side
        log_head = args.po_linear_head and args.po_head_param == "log" and args.po_reg_data
        args.po_head_reverse_lambda = args.po_reg_lambda if log_head else 0.0
    return args


def check_model_name(name: str, flag: str = "--model") -> None:
    """An unknown model is a one-line error listing the nearest known names (not open_clip's traceback)."""

    if name is None or name.startswith(MODEL_SCHEMAS):
        return
    known = open_clip.list_models()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"nearest: {', '.join(near)}" if near else "see open_clip.list_models()"
        raise UsageError(f"{flag} {name!r} is not a known open_clip model ({hint})")


def _check_regulariser_flags(args) -> None:
    if args.po_reg_data:
        if args.po_reg_lambda is not None and args.po_reg_lambda < 0:
            raise UsageError(f"--po-reg-lambda must be >= 0, got {args.po_reg_lambda}")
        return
    given = [f for f in REG_ONLY_FLAGS if getattr(args, f) is not None]
    if given == ["po_reg_lambda"] and args.po_reg_lambda == 0:
        return  # λ = 0 says "no regulariser", which is what happens
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise UsageError(f"{flags} need(s) --po-reg-data (clean image-text shards for the KL regulariser); "
                         "without it there is no regulariser")


def _check_ref_cache(args) -> None:
    if not args.po_ref_cache:
        if args.po_ref_cache_verify:
            raise UsageError("--po-ref-cache-verify checks a --po-ref-cache; there is none")
        return
    if args.po_ref_cache_verify < 0:
        raise UsageError(f"--po-ref-cache-verify must be >= 0 (samples to recompute), got {args.po_ref_cache_verify}")

    if args.po_linear_head:
        raise UsageError("--po-ref-cache is not for --po-linear-head: its reference is the frozen backbone, free")
    if args.po_ref_sync_steps:
        raise UsageError("--po-ref-cache cannot follow the policy (--po-ref-sync-steps): cached features are fixed")
    if not deterministic_augmentation(args.aug_cfg):
        if not args.po_ref_cache_approximate:
            raise UsageError("--po-ref-cache is exact only with deterministic training preprocessing "
                             "(--aug-cfg scale='(1.0, 1.0)', no colour jitter/grey-scale/erasing/timm); "
                             "add --po-ref-cache-approximate to use the cached view anyway")
        logging.warning("--po-ref-cache-approximate: the reference sees the cached view of each image, the policy "
                        "a random augmentation of it; the reference log-probs are an approximation")


def _check_paths(args) -> None:
    for flag in ("po_eval_images", "po_eval_typographic", "po_classnames"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):  # found now, not after the first epoch
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file or directory")


def _warn_inert(args, objective) -> None:
    if args.po_kto_kl != "mismatched" and not objective.needs_kl:
        logging.warning(f"--po-kto-kl has no effect with --po-loss {args.po_loss} (only KTO uses a reference point)")


def validate(args) -> None:
    if plain_clip_run(args, po_argument_parser()):
        return  # open_clip's own CLIP training: its flags are its own business
    known = po_losses.list_losses()
    if args.po_loss is None:
        raise UsageError("--po-loss is required (one of: " + ", ".join(known) + ")")
    try:
        names = po_losses.parse_spec(args.po_loss)
    except ValueError as e:
        raise UsageError(f"--po-loss {args.po_loss!r}: {e}".splitlines()[0]) from e
    for name in names:
        if not po_losses.is_loss(name):
            raise UsageError(f"unknown --po-loss {name!r}; known: " + ", ".join(known))
    if not args.train_data:
        raise UsageError("--train-data (triplet shards, see README 'Data') is required")
    check_model_name(args.model)
    check_model_name(args.po_ref_model, "--po-ref-model")
    if args.po_candidates == "classes" and not args.po_classnames:
        raise UsageError("--po-candidates classes needs --po-classnames FILE")
    if args.po_linear_head and (args.po_ref_model or args.po_ref_pretrained):
        raise UsageError("--po-linear-head uses the frozen backbone itself as reference; "
                         "drop --po-ref-model/--po-ref-pretrained")
    for flag in ("--po-head-towers", "--po-head-param", "--po-head-reverse-lambda"):
        if getattr(args, flag[2:].replace("-", "_")) and not args.po_linear_head:
            raise UsageError(f"{flag} is for --po-linear-head")
    if args.po_head_reverse_lambda is not None and args.po_head_reverse_lambda < 0:
        raise UsageError(f"--po-head-reverse-lambda must be >= 0, got {args.po_head_reverse_lambda}")
    if args.po_ref_sync_steps < 0 or not 0 < args.po_ref_sync_alpha <= 1:
        raise UsageError("--po-ref-sync-steps must be >= 0 and --po-ref-sync-alpha in (0, 1]")
    if args.po_ref_sync_steps and args.po_linear_head:
        raise UsageError("--po-ref-sync-steps cannot follow a linear head: its reference is the frozen backbone")
    _check_ref_cache(args)
    try:
        check_open_clip_options(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    _check_regulariser_flags(args)
    if args.po_max_bad_steps < 1:
        raise UsageError("--po-max-bad-steps must be >= 1")
    if args.po_eval_typographic and not args.po_eval_images:
        raise UsageError("--po-eval-typographic needs --po-eval-images (the clean set and its class names)")
    _check_paths(args)
    if args.po_eval_weights == "average" and args.po_average == "none":
        raise UsageError("--po-eval-weights average needs --po-average bma|ema")
    try:
        beta = po_losses.parse_hparams(args.po_hparam).get("beta")
        if beta is not None and not (isinstance(beta, (int, float)) and beta > 0):
            raise UsageError(f"--po-beta must be > 0, got {beta}")
        objective = build_objective(args)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--po-loss {args.po_loss}: {e}".splitlines()[0]) from e
    _warn_inert(args, objective)


def build_objective(args):
    """The objective (or weighted mixture) the flags name, with their hyper-parameters."""
    hparams = po_losses.parse_hparams(args.po_hparam)
    weights = po_losses.parse_weights(args.po_loss_weights) if args.po_loss_weights else None
    return po_losses.build_objective(args.po_loss, weights, hparams)
