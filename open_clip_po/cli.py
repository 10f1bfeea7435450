"""The trainer's own flags (``--po-*``): parsed before open_clip's, checked once, before anything is built.

``parse_po_args(argv, open_clip_parse_args)`` pre-parses ours with ``parse_known_args``, hands the rest to
open_clip's parser and sets our attributes on its namespace (so they land in ``params.txt``).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os

from . import losses as po_losses
from .head import default_param
from .options import check_open_clip_options, plain_clip_run

HPARAM_FLAGS = {"po_beta": "beta", "po_label_smoothing": "label_smoothing",
                "po_desirable_weight": "desirable_weight", "po_undesirable_weight": "undesirable_weight"}
REG_LAMBDA_DEFAULT = 1.0
# Flags that only mean something with --po-reg-data: given without it, they would be silently inert.
REG_ONLY_FLAGS = ("po_reg_lambda", "po_reg_kl", "po_reg_batch_size", "po_reg_num_samples", "po_head_reverse_lambda")
MODEL_SCHEMAS = ("hf-hub:", "local-dir:")


class UsageError(SystemExit):
    """A bad flag or combination (or a run that must stop): one line on stderr, exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"open_clip_po.main: error: {message}")


def po_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("preference optimisation (open_clip_po)")
    g.add_argument("--po-loss", default=None,
                   help="objective, or a comma-separated mixture (dpo,ce): " + ", ".join(po_losses.list_losses()))
    g.add_argument("--po-loss-weights", default=None,
                   help="weights of a mixture's terms, e.g. 1,0.1 (RPO = dpo,ce); default: all 1")
    g.add_argument("--po-hparam", action="append", default=[], metavar="NAME=VALUE",
                   help="any hyper-parameter of the objective by its TRL name (repeatable; dpo.beta=... for one "
                        "term of a mixture), e.g. f_divergence_type=js_divergence, simpo_gamma=0.5")
    g.add_argument("--po-beta", type=float, default=None, help="β (objective's paper default if unset)")
    g.add_argument("--po-label-smoothing", type=float, default=None, help="cDPO / robust ε")
    g.add_argument("--po-desirable-weight", type=float, default=None, help="KTO λ_D")
    g.add_argument("--po-undesirable-weight", type=float, default=None, help="KTO λ_U")
    g.add_argument("--po-kto-kl", choices=("mismatched", "exact"), default="mismatched",
                   help="KTO reference point z: TRL's mismatched pairs, or the exact KL over the candidates")
    g.add_argument("--po-reg-data", default=None, help="clean image-text shards D_reg for the KL regulariser")
    # None = not given: told apart from the default so that λ without --po-reg-data is an error, not ignored
    g.add_argument("--po-reg-lambda", type=float, default=None, help=f"λ of Eq. 14 (default {REG_LAMBDA_DEFAULT})")
    g.add_argument("--po-reg-kl", choices=("forward", "reverse"), default=None,
                   help="forward = KL(π_θ‖π_ref) (the paper, default), reverse = KL(π_ref‖π_θ) (its released code)")
    g.add_argument("--po-reg-batch-size", type=int, default=None, help="b_reg per step (default: --batch-size)")
    g.add_argument("--po-reg-num-samples", type=int, default=None, help="size of D_reg if no sizes.json")
    g.add_argument("--po-strict-data", action="store_true", help="stop at the first bad sample")
    g.add_argument("--po-candidates", choices=("batch", "classes"), default="batch",
                   help="candidate captions of π(y|x): the global batch's, or one prompt per class")
    g.add_argument("--po-classnames", default=None, help="file with one class name per line")
    g.add_argument("--po-template", default="a photo of a {}.", help="class prompt template")
    g.add_argument("--po-ref-model", default=None, help="reference architecture (default: the policy's)")
    g.add_argument("--po-ref-pretrained", default=None, help="reference weights (default: the policy's start)")
    g.add_argument("--ref-model", dest="po_ref_model", help=argparse.SUPPRESS)  # older spellings, kept
    g.add_argument("--ref-pretrained", dest="po_ref_pretrained", help=argparse.SUPPRESS)
    g.add_argument("--po-ref-cache", default=None,
                   help="folder of reference features computed ahead (python -m open_clip_po.ref_cache): no "
                        "reference model is built")
    g.add_argument("--po-ref-cache-approximate", action="store_true",
                   help="accept a cache under random training augmentation (the cached view is not the trained one)")
    g.add_argument("--po-ref-sync-steps", type=int, default=0,
                   help="TR-DPO: every N optimizer steps move the reference towards the policy (0 = frozen)")
    g.add_argument("--po-ref-sync-alpha", type=float, default=0.6,
                   help="TR-DPO's α: θ_ref ← α θ + (1 − α) θ_ref (TRL's ref_model_mixup_alpha; 1 = copy)")
    g.add_argument("--po-linear-head", action="store_true", help="train only a linear head W on frozen towers")
    g.add_argument("--po-head-towers", choices=("both", "image"), default=None,
                   help="where the head acts: both towers, similarity xᵀWᵀWy (the paper's, default), or the image "
                        "tower only, (Wx)ᵀy, which can reverse a concept the paper's form can only erase "
                        "(docs/surgery.md)")
    g.add_argument("--po-head-param", choices=("log", "dense"), default=None,
                   help="how W is learned: log = W = exp(A), scaled exactly as exp(tA) for every t, --wd pulling "
                        "it towards the identity (default on both towers); dense = W itself, the paper's (default "
                        "on the image tower: its straight line keeps a flip) (docs/surgery.md)")
    g.add_argument("--po-head-reverse-lambda", type=float, default=None,
                   help="μ: weight of the KL on D_reg of the head turned around (W_{-1}: exp(−A), or 2I − W on the "
                        "image tower), so that t < 0 undoes what the head learned instead of wrecking the features "
                        "(default: --po-reg-lambda's value for a log head, 0 for a dense one; 0 = the paper's "
                        "objective)")
    g.add_argument("--po-full-text-context", action="store_true",
                   help="run the text tower over all context_length positions, as open_clip does (default: only over "
                        "each batch's caption span; exact for causal, argmax-pooled text towers)")
    g.add_argument("--po-average", choices=("none", "bma", "ema"), default="none")
    g.add_argument("--po-bma-gamma", type=float, default=0.7)
    g.add_argument("--po-ema-decay", type=float, default=0.999)
    g.add_argument("--po-eval-weights", choices=("raw", "average"), default="raw",
                   help="weights the epoch-end evaluation uses")
    g.add_argument("--po-eval-images", default=None, help="clean class-folder eval set (per-epoch O accuracy)")
    g.add_argument("--po-eval-typographic", default=None, help="attacked copy of it (per-epoch T accuracy)")
    g.add_argument("--po-max-bad-steps", type=int, default=10, help="non-finite losses in a row before stopping")
    g.add_argument("--logs-dir", default=None, help="alias of open_clip's --logs (torchrun swallows --logs)")
    return p


def parse_po_args(argv, open_clip_parse_args):
    ours, rest = po_argument_parser().parse_known_args(argv)
    if ours.logs_dir is not None:
        rest = [*rest, "--logs", ours.logs_dir]
    args = open_clip_parse_args(rest)
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
    import open_clip

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
        return
    from .ref_cache import deterministic_augmentation

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
    if args.po_beta is not None and args.po_beta <= 0:
        raise UsageError(f"--po-beta must be > 0, got {args.po_beta}")
    if args.po_max_bad_steps < 1:
        raise UsageError("--po-max-bad-steps must be >= 1")
    if args.po_eval_typographic and not args.po_eval_images:
        raise UsageError("--po-eval-typographic needs --po-eval-images (the clean set and its class names)")
    _check_paths(args)
    if args.po_eval_weights == "average" and args.po_average == "none":
        raise UsageError("--po-eval-weights average needs --po-average bma|ema")
    try:
        objective = build_objective(args)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--po-loss {args.po_loss}: {e}".splitlines()[0]) from e
    _warn_inert(args, objective)


def build_objective(args):
    """The objective (or weighted mixture) the flags name, with their hyper-parameters."""
    hparams = po_losses.parse_hparams(args.po_hparam)
    hparams.update({name: getattr(args, flag) for flag, name in HPARAM_FLAGS.items()
                    if getattr(args, flag) is not None})
    weights = po_losses.parse_weights(args.po_loss_weights) if args.po_loss_weights else None
    return po_losses.build_objective(args.po_loss, weights, hparams)
