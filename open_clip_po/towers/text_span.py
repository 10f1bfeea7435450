"""A causal, argmax-pooled text tower run only over the batch's caption span, not all ``context_length`` positions.

open_clip's text tower runs over every position of the context (77 for ViT-B-32), yet PO captions are 5–20 tokens
and a PO step encodes 2B of them. In open_clip's standard tower — a causal attention mask and ``argmax`` pooling
(the end-of-text token has the largest id) — no position after the pooled one can reach it: attention looks back
only, LayerNorm and MLP act per token. So the tower run on ``text[:, :n]``, n = the batch's last pooled position
+ 1, gives the same features and gradients (to float rounding) for a fraction of the FLOPs. n is rounded up to a
multiple of 8 (fewer distinct shapes, GEMM-friendly); at the full length, and while ``torch.compile`` or
``torch.jit.trace`` traces (such a graph has no data-dependent shapes), open_clip's own method runs.

:func:`run_text_over_caption_span` rebinds the text encoder on the model *instance* — ``encode_text`` of a ``CLIP``,
``text.forward`` of a ``CustomTextCLIP``'s ``TextTransformer`` — and leaves any other tower as it is, saying why.
open_clip's classes, the parameters and the ``state_dict`` are untouched; ``copy.deepcopy`` carries the rebinding
to the copy. Whoever keys captions by their token rows (the reference's text memo, the reference cache) still sees
full rows: the trim happens inside the encoder only.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from .unwrap import unwrap

SPAN_MULTIPLE = 8


def caption_span(text: torch.Tensor, multiple: int = SPAN_MULTIPLE) -> int:
    """Positions the batch's argmax-pooled tokens need: the last pooled position + 1, rounded up to ``multiple``,
    at most the row length."""
    needed = int(text.argmax(dim=-1).max()) + 1
    return min(text.shape[-1], -(-needed // multiple) * multiple)


def _span(text: torch.Tensor, context_length: int) -> int | None:
    """The span to run over, or None where open_clip's own full-length method should run. Reading the span is one
    device-to-host sync per call (on GPU)."""
    # a traced or compiled graph would keep this batch's span as a constant: it runs open_clip's full length
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or text.dim() != 2 or text.shape[0] == 0 \
            or text.shape[1] != context_length:
        return None
    n = caption_span(text)
    return n if n < context_length else None


def _tower(embedding, positional_embedding, transformer, attn_mask, ln_final, projection, text, n):
    """open_clip's causal, argmax-pooled text tower (``CLIP.encode_text``, ``TextTransformer.forward``) on
    ``text[:, :n]``; the slices keep the gradient flowing into the full parameters."""
    text = text[:, :n]
    cast_dtype = transformer.get_cast_dtype()
    x = embedding(text).to(cast_dtype)
    x = x + positional_embedding[:n].to(cast_dtype)
    x = transformer(x, attn_mask=attn_mask[:n, :n])
    x = ln_final(x)
    x = text_global_pool(x, text, pool_type="argmax")
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x


def _clip_encode_text(self, text, normalize: bool = False):
    n = _span(text, self.positional_embedding.shape[0])
    if n is None:
        return type(self).encode_text(self, text, normalize=normalize)
    x = _tower(self.token_embedding, self.positional_embedding, self.transformer, self.attn_mask, self.ln_final,
               self.text_projection, text, n)
    return F.normalize(x, dim=-1) if normalize else x


def _text_transformer_forward(self, text):
    n = _span(text, self.positional_embedding.shape[0])
    if n is None:
        return type(self).forward(self, text)
    return _tower(self.token_embedding, self.positional_embedding, self.transformer, self.attn_mask, self.ln_final,
                  self.text_projection, text, n)


def _is_causal(mask: torch.Tensor, length: int) -> bool:
    upper = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    return mask.shape == (length, length) and bool(torch.isneginf(mask).eq(upper).all()) \
        and bool((mask[~upper] == 0).all())


def _target(model: nn.Module):
    """(the module whose method is rebound, its name, the replacement) for an eligible model, or the reason why
    it is not eligible."""
    if isinstance(model, CLIP):
        if type(model).encode_text is not CLIP.encode_text:
            return f"{type(model).__name__} has its own encode_text"
        tower, pool, target = model, model.text_pool_type, (model, "encode_text", _clip_encode_text)
    elif isinstance(model, CustomTextCLIP):
        tower = model.text
        if type(tower) is not TextTransformer:
            return f"its text tower is a {type(tower).__name__}, not open_clip's TextTransformer"
        if tower.cls_emb is not None:
            return "its text tower appends a class token"
        if tower.use_pad_mask:
            return "its text tower masks padding"
        if tower.output_tokens:
            return "its text tower returns token features"
        pool, target = tower.pool_type, (tower, "forward", _text_transformer_forward)
    else:
        return f"{type(model).__name__} is neither open_clip's CLIP nor a CustomTextCLIP"
    if pool != "argmax":
        return f"its text pooling is {pool!r}, not 'argmax'"
    if tower.attn_mask is None:
        return "its text attention is bidirectional (no causal mask)"
    if not _is_causal(tower.attn_mask, tower.positional_embedding.shape[0]):
        return "its text attention mask is not the causal one"
    return target


def runs_text_over_caption_span(model: nn.Module) -> bool:
    """Whether :func:`run_text_over_caption_span` has rebound this model's text encoder."""
    target = _target(unwrap(model))
    if isinstance(target, str):
        return False
    owner, name, fn = target
    return getattr(vars(owner).get(name), "__func__", None) is fn


def run_text_over_caption_span(model: nn.Module) -> str | None:
    """Rebind ``model``'s text encoder to run over each batch's caption span. Returns None when it does (also when
    it already did), else why it runs over the full context as open_clip's does (for the caller to log).
    Idempotent."""
    model = unwrap(model)
    target = _target(model)
    if isinstance(target, str):
        return target
    owner, name, fn = target
    bound = vars(owner).get(name)
    if getattr(bound, "__func__", None) is fn:
        return None
    if bound is not None:
        return f"its {name} is already replaced on the instance (e.g. by a linear head; apply this first)"
    setattr(owner, name, types.MethodType(fn, owner))
    return None


def configure_text_span(model: nn.Module, full_text_context: bool, who: str = "the policy") -> bool:
    """Run ``model``'s text tower over each batch's caption span unless ``full_text_context``
    (``--po-full-text-context``); logs once which it does and, where it cannot, why. True when it runs the span."""
    length = getattr(unwrap(model), "context_length", None)
    full = f"all {length} context positions" if length else "all context positions"
    if full_text_context:
        logging.info(f"{who}'s text tower runs over {full} (--po-full-text-context)")
        return False
    why = run_text_over_caption_span(model)
    if why is None:
        logging.info(f"{who}'s text tower runs over each batch's caption span (causal mask, argmax pooling: the "
                     f"same features; --po-full-text-context runs {full})")
        return True
    logging.info(f"{who}'s text tower runs over {full}: {why}")
    return False
