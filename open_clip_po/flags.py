"""The ``--po-*`` flags: one vocabulary for every command that takes a training command line.

``po_argument_parser()`` defines them; the trainer (``open_clip_po.trainer.cli``) parses and checks them before
open_clip's own flags, and the reference-cache builder and the sweep driver read the same command line with it.
Also the small argv helpers the command lines share.
"""
from __future__ import annotations

import argparse

from . import losses as po_losses

REG_LAMBDA_DEFAULT = 1.0
# Shorthands for the objective's hyper-parameters most runs set; each is --po-hparam NAME=VALUE under another name.
HPARAM_ALIASES = (("--po-beta", "beta", "β (the objective's paper default if unset)"),
                  ("--po-label-smoothing", "label_smoothing", "cDPO / robust ε"),
                  ("--po-desirable-weight", "desirable_weight", "KTO λ_D"),
                  ("--po-undesirable-weight", "undesirable_weight", "KTO λ_U"))


class _HparamAlias(argparse.Action):
    """``--po-beta 0.5`` appends ``beta=0.5`` to ``--po-hparam``'s list."""

    def __init__(self, option_strings, dest, hparam, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.hparam = hparam

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), f"{self.hparam}={value!r}"])


def po_argument_parser(**parser_kwargs) -> argparse.ArgumentParser:
    """The ``--po-*`` flags; ``parser_kwargs`` (prog, usage, description, ...) go to ``ArgumentParser`` for a
    command that prints them in its ``--help``."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, **parser_kwargs)
    g = p.add_argument_group("preference optimisation (open_clip_po)")
    g.add_argument("--po-loss", default=None, metavar="OBJECTIVE",
                   help="objective, or a comma-separated mixture (dpo,ce): " + ", ".join(po_losses.list_losses())
                   + ". Without it (and every other --po-* flag) the run is open_clip's plain CLIP training")
    g.add_argument("--po-loss-weights", default=None,
                   help="weights of a mixture's terms, e.g. 1,0.1 (RPO = dpo,ce); default: all 1")
    g.add_argument("--po-hparam", action="append", default=[], metavar="NAME=VALUE",
                   help="any hyper-parameter of the objective by its TRL name (repeatable; dpo.beta=... for one "
                        "term of a mixture), e.g. f_divergence_type=js_divergence, simpo_gamma=0.5")
    for flag, name, text in HPARAM_ALIASES:
        g.add_argument(flag, type=float, dest="po_hparam", action=_HparamAlias, hparam=name, metavar=name.upper(),
                       help=f"{text}: the same as --po-hparam {name}=VALUE")
    g.add_argument("--po-kto-kl", choices=("mismatched", "exact"), default="mismatched",
                   help="KTO reference point z: TRL's mismatched pairs, or the exact KL over the candidates")
    g.add_argument("--po-reg-data", default=None, metavar="SHARDS",
                   help="clean image-text shards D_reg for the KL regulariser")
    # None = not given: told apart from the default so that λ without --po-reg-data is an error, not ignored
    g.add_argument("--po-reg-lambda", type=float, default=None, help=f"λ of Eq. 14 (default {REG_LAMBDA_DEFAULT})")
    g.add_argument("--po-reg-kl", choices=("forward", "reverse"), default=None,
                   help="forward = KL(π_θ‖π_ref) (the paper, default), reverse = KL(π_ref‖π_θ) (its released code)")
    g.add_argument("--po-reg-batch-size", type=int, default=None, help="b_reg per step (default: --batch-size)")
    g.add_argument("--po-reg-num-samples", type=int, default=None, help="size of D_reg if no sizes.json")
    g.add_argument("--po-strict-data", action="store_true", help="stop at the first bad sample")
    g.add_argument("--po-candidates", choices=("batch", "classes"), default="batch",
                   help="candidate captions of π(y|x): the global batch's, or one prompt per class")
    g.add_argument("--po-classnames", default=None, metavar="FILE", help="file with one class name per line")
    g.add_argument("--po-template", default="a photo of a {}.", help="class prompt template")
    g.add_argument("--po-ref-model", default=None, help="reference architecture (default: the policy's)")
    g.add_argument("--po-ref-pretrained", default=None, help="reference weights (default: the policy's start)")
    g.add_argument("--po-ref-cache", default=None, metavar="DIR",
                   help="folder of reference features computed ahead (python -m open_clip_po.ref_cache): no "
                        "reference model is built")
    g.add_argument("--po-ref-cache-verify", type=int, default=0, metavar="N",
                   help="at start-up, recompute N samples' reference features from --pretrained (or --po-ref-*) and "
                        "compare them with the cache's (the cache's digests are always checked; default 0)")
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
    g.add_argument("--po-average", choices=("none", "bma", "ema"), default="none",
                   help="keep a weight average beside the trained weights, saved in each checkpoint: BMA (the "
                        "paper's App. H, Beta(γ, γ) weights over the run's steps) or EMA")
    g.add_argument("--po-bma-gamma", type=float, default=0.7, help="BMA's γ; < 1 weights both ends of the run "
                   "(default 0.7, the paper's)")
    g.add_argument("--po-ema-decay", type=float, default=0.999, help="EMA's decay per optimizer step (default 0.999)")
    g.add_argument("--po-eval-weights", choices=("raw", "average"), default="raw",
                   help="weights the epoch-end evaluation uses")
    g.add_argument("--po-eval-images", default=None, help="clean class-folder eval set (per-epoch O accuracy)")
    g.add_argument("--po-eval-typographic", default=None, help="attacked copy of it (per-epoch T accuracy)")
    g.add_argument("--po-max-bad-steps", type=int, default=10, help="non-finite losses in a row before stopping")
    g.add_argument("--logs-dir", default=None, metavar="DIR",
                   help="alias of open_clip's --logs (torchrun swallows --logs)")
    return p



def negative_values_as_one_token(argv: list[str], flags: tuple[str, ...] = ("--t",)) -> list[str]:
    """``--t -1e-3`` → ``--t=-1e-3`` (also ``-2``, ``-4:4:0.5``, ``-.5``).

    argparse reads a value that starts with "-" as an option unless it looks like a plain negative
    number, so exponents and ranges would otherwise be refused.
    """
    out, i = [], 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in flags and len(value) > 1 and value[0] == "-" and (value[1].isdigit() or value[1] == "."):
            out.append(f"{argv[i]}={value}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out
