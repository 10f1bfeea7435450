"""Which open_clip training options work with preference optimisation, which are refused, and why.

``OPTION_RULES`` is the one list (docs/training.md shows it as a table; ``list_option_rules()`` is its face).
``check_open_clip_options(args)`` raises a one-line ``ValueError`` for the first refused combination in a PO
run and logs a warning for options that have no effect on PO. ``plain_clip_run(args, po_parser)`` decides
whether ``open_clip_po.main`` runs PO at all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import open_clip


@dataclass(frozen=True)
class OptionRule:
    flags: str  # as the user writes them
    verdict: str  # "works", "refused" or "no effect"
    why: str
    applies: Callable = lambda args: False  # refused / no effect: does this run use the option?


def is_coca(model_name: str) -> bool:
    """CoCa: a config with a multimodal (captioning) decoder, or open_clip's own name test."""
    config = open_clip.get_model_config(model_name) or {}
    return "multimodal_cfg" in config or "coca" in model_name.lower()


def _get(name):
    return lambda args: bool(getattr(args, name, None))


OPTION_RULES = (
    OptionRule("--grad-checkpointing", "works", "the policy recomputes activations in backward; the frozen "
               "reference runs under no_grad and is built before checkpointing is switched on"),
    OptionRule("--accum-freq N", "works", "each micro-batch backpropagates loss / N; with --po-candidates batch "
               "the candidate set of π(y|x) is one micro-batch's global batch (batch size × world size), not the "
               "accumulated one — DPO/IPO do not depend on it (the partition function cancels), KTO's KL "
               "estimate and the regulariser's softmax do"),
    OptionRule("--dataset-resampled, --train-data-upsampling-factors", "works", "shards drawn with replacement, "
               "weighted per `::` source, seeded by --seed, the epoch, the rank and the worker"),
    OptionRule("--lock-image", "works", "the image tower is frozen after the reference copy is taken; the "
               "reference keeps its own copy"),
    OptionRule("--lock-text, --lock-text-unlocked-layers N", "works", "fully locked with frozen LayerNorm: the "
               "reference shares the policy's text features; with unlocked layers it keeps its own text tower "
               "(open_clip's own text tower also needs --lock-text-freeze-layer-norm)"),
    OptionRule("--torchcompile", "works", "the compiled policy serves the PO criterion, its text tower over the "
               "whole context (a compiled graph has no data-dependent shapes); the reference stays eager and runs "
               "the captions' span"),
    OptionRule("--siglip, SigLIP configs (init_logit_bias)", "works", "the policy is still a softmax over the "
               "candidate captions; a logit bias adds the same constant to every candidate's logit and cancels, "
               "so the PO loss ignores it (the sigmoid loss is not used)"),
    OptionRule("CoCa models", "refused", "PO scores image-caption pairs with the contrastive towers; the "
               "captioning decoder would run on every candidate and get no gradient",
               lambda args: is_coca(args.model)),
    OptionRule("--distill-model, --distill-pretrained", "refused", "the frozen reference takes the teacher's "
               "place", lambda args: _get("distill_model")(args) or _get("distill_pretrained")(args)),
    OptionRule("--horovod", "refused", "open_clip_po's collectives use torch.distributed; launch with torchrun",
               _get("horovod")),
    OptionRule("--delete-previous-checkpoint", "works", "open_clip deletes epoch_{n-1}.pt after epoch_n.pt is "
               "written (atomically, with the PO keys)"),
    OptionRule("--remote-sync DIR", "works", "open_clip copies the run folder (checkpoints with the PO keys, "
               "po_eval.jsonl) to DIR; --resume latest then looks there (s3 only, as in open_clip)"),
    OptionRule("--local-loss, --gather-with-grad", "no effect", "PO always computes the global-batch loss from "
               "all-gathered features, the local shard keeping its gradient",
               lambda args: _get("local_loss")(args) or _get("gather_with_grad")(args)),
)


def list_option_rules(verdict: str | None = None) -> list[OptionRule]:
    return [r for r in OPTION_RULES if verdict is None or r.verdict == verdict]


def check_open_clip_options(args) -> None:
    """One-line ValueError for the first refused open_clip option of a PO run; warnings for ineffective ones."""
    for rule in list_option_rules("refused"):
        if rule.applies(args):
            raise ValueError(f"{rule.flags} cannot be combined with --po-loss: {rule.why}")
    for rule in list_option_rules("no effect"):
        if rule.applies(args):
            logging.warning(f"{rule.flags} has no effect on PO training: {rule.why}")


# Flags that mean the same in a plain CLIP run as in a PO run, so they do not make a run a PO run.
EVERY_RUN_FLAGS = ("logs_dir", "po_full_text_context")


def plain_clip_run(args, po_parser) -> bool:
    """True when no ``--po-*`` option (nor ``--ref-*``) is given: run open_clip's own CLIP training.

    The run then only gets what ``open_clip_po.main`` adds to every run (shuffles seeded from ``--seed``,
    ``--logs-dir``, the text tower over each batch's caption span unless ``--po-full-text-context``, atomic
    checkpoints, DDP on CPU). Any other PO option without ``--po-loss`` is a PO run that lacks its objective, and
    validation says so.
    """
    if getattr(args, "po_loss", None) is not None:
        return False
    defaults = vars(po_parser.parse_args([]))
    return all(getattr(args, key, value) == value for key, value in defaults.items() if key not in EVERY_RUN_FLAGS)
