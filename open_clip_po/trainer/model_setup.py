"""The policy and its reference as a PO run builds them, and the stand-in for DDP in linear-head mode.

``ModelSetup.create_model_and_transforms`` takes open_clip's place: it lets open_clip build the policy, then
— before resume, locking, the head or DDP touch it — lets its text tower run over each batch's caption span
(``open_clip_po.towers.text_span``; the reference copy and the head inherit it), chooses the reference strategy (see
``open_clip_po.reference``) and, in linear-head mode, freezes the towers and attaches W.
"""
from __future__ import annotations

import copy
import logging
import os

import torch

from ..checkpoint import CheckpointError, dropped_head_warning, load_checkpoint
from ..data.patterns import expand_shards
from ..head import attach_linear_head, has_linear_head
from ..ref_cache import CacheError, load_ref_cache
from ..ref_cache.spot_check import spot_check
from ..ref_cache.store import existing, run_signature
from ..reference import CachedReference, make_reference
from ..towers.attention_layout import contiguous_attention_under_autocast
from ..towers.text_span import configure_text_span
from .cli import UsageError

COMPILE_LOGGERS = ("torch._dynamo", "torch._subclasses", "torch._inductor")


class LocalReplica(torch.nn.Module):
    """Stands where DDP would in linear-head mode: only W trains, its gradient is all-reduced by hand."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def explain_bad_pretrained(path, flag: str, error: Exception) -> None:
    """open_clip reports a file that is not a checkpoint as e.g. ``KeyError: 101``; say what the file is."""
    if path and os.path.isfile(path) and "://" not in str(path):
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            raise UsageError(f"{flag}: {e}") from error


def _load_cache(args, preprocess_train, device):
    """The cache, its digests checked (and ``--po-ref-cache-verify N`` samples recomputed) on every rank."""
    urls = expand_shards(args.train_data)[0]
    if args.po_reg_data:
        urls += expand_shards(args.po_reg_data, flag="--po-reg-data")[0]
    urls = existing(urls)
    try:
        cache = load_ref_cache(args.po_ref_cache, run_signature(args, preprocess_train), urls,
                               need_prompts=args.po_candidates == "classes")
    except CacheError as e:
        raise UsageError(f"--po-ref-cache: {e}") from e
    if args.po_ref_cache_verify:
        error = spot_check(cache, args, urls, device)
        if error:
            raise UsageError(f"--po-ref-cache-verify: {error}")
    return cache


class ModelSetup:
    def __init__(self, args_of, create_model_and_transforms, plain: bool = False):
        self._args_of, self._create = args_of, create_model_and_transforms
        self.plain = plain         # a plain CLIP run: the caption span only, no reference, no head
        self.model = None          # the policy, as open_clip built it (never wrapped)
        self.reference = None
        self.preprocess_val = None

    def _create_checked(self, name, pretrained, flag, *a, **kw):
        warning = dropped_head_warning(pretrained, flag)
        if warning:
            logging.warning(warning)
        try:
            return self._create(name, pretrained, *a, **kw)
        except Exception as e:
            explain_bad_pretrained(pretrained, flag, e)
            raise

    def create_model_and_transforms(self, model_name, pretrained=None, *a, **kw):
        # open_clip's setup_logging (just run) set every logger to INFO; torch's then print compile
        # statistics at exit even when nothing was compiled
        for name in logging.root.manager.loggerDict:
            if name.startswith(COMPILE_LOGGERS):
                logging.getLogger(name).setLevel(logging.WARNING)
        built = self._create_checked(model_name, pretrained, "--pretrained", *a, **kw)
        if self.model is None:  # the first call builds the policy (a later one, e.g. a distill teacher, is not ours)
            self.model, self.preprocess_val = built[0], built[2]
            # before the reference copy and the head: both take the policy's text encoder as it is now
            configure_text_span(built[0], self._args_of().po_full_text_context,
                                who="the model" if self.plain else "the policy")
            if not self.plain:
                self.reference = self._build_reference(built[0], kw, built[1])
        return built

    def _build_reference(self, model, create_kwargs, preprocess_train):
        args = self._args_of()
        if args.po_ref_cache:
            return CachedReference(_load_cache(args, preprocess_train, create_kwargs.get("device")))
        if args.po_linear_head:
            model.requires_grad_(False)
            # the frozen backbone's passes run without grad: under autocast, give them the policy's GEMM layout
            contiguous_attention_under_autocast(model)
            attach_linear_head(model, towers=args.po_head_towers, param=args.po_head_param).requires_grad_(True)
            return make_reference(is_base_of_head=True)
        if args.po_ref_model or args.po_ref_pretrained:
            ref, _, _ = self._create_checked(
                args.po_ref_model or args.model, args.po_ref_pretrained, "--po-ref-pretrained",
                precision=args.precision, device=create_kwargs.get("device"), output_dict=True,
                cache_dir=args.cache_dir)
            configure_text_span(ref, args.po_full_text_context, who="the reference")
            return make_reference(ref)
        # A copy taken now holds exactly the pre-trained weights; with a locked, frozen text tower the policy's
        # text features are the reference's.
        shares_text = bool(args.lock_text and args.lock_text_unlocked_layers == 0
                           and args.lock_text_freeze_layer_norm)
        return make_reference(copy.deepcopy(model), shares_text=shares_text)

    def ddp(self, module, device_ids=None, **kwargs):
        if module is self.model and has_linear_head(module) and self._args_of().po_linear_head:
            return LocalReplica(module)
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None  # open_clip passes device_ids=[cpu]; DDP only accepts that for GPU modules
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)
