"""Training steps built as a run builds them, on any device, for the step benchmarks (bench_train.py, gpu.py).

A *family* is the steps measured together on one model and batch:

- ``full`` (full fine-tune): ``clip_span`` and ``clip_stock`` — open_clip's CLIP step (ClipLoss, backward, AdamW)
  with its text tower over the batch's caption span (``open_clip_po.towers.text_span``, what a plain CLIP run through
  ``open_clip_po.main`` gets) and over the full context (open_clip's own ``encode_text``), one model stepped by
  both; ``po_online`` and ``po_cache`` — a PO step (DPO, policy on B images and 2B captions) with the frozen
  reference computed online or read from a reference cache, one policy stepped by both; ``po_head`` — a PO step
  training only a linear head on the frozen towers, and ``frozen_forward``, those towers' forward alone (the head
  step's floor);
- ``lock_text``: the same CLIP and PO steps with the text tower locked (``--lock-text
  --lock-text-freeze-layer-norm``); the online reference then shares the policy's text features.

Every PO model is set up as ``open_clip_po.trainer.model_setup`` sets it up: the caption span first, then the reference copy
(or the head); forward passes run under ``--precision``'s autocast, backward and the optimizer step outside it, as
in ``open_clip_po.trainer.epoch``. Captions are shaped like PO's: the start token, random word tokens, the end token, zero
padding; distinct captions never repeat, so the reference's text memo is cleared before each step.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

import open_clip
import open_clip_po  # noqa: F401  (registers po-tiny)
from open_clip_po.criterion import POCriterion, POSettings
from open_clip_po.head import attach_linear_head
from open_clip_po.losses import get_loss
from open_clip_po.ref_cache import RefCache
from open_clip_po.reference import CachedReference, make_reference
from open_clip_po.towers.text_span import caption_span, run_text_over_caption_span
from open_clip_train.precision import get_autocast

SOT, EOT = 49406, 49407  # open_clip's tokenizer: start and end of text (the end token has the largest id)
WORDS = (4, 18)  # words per PO-length caption, e.g. "a photo of a dog." is 5
FAMILIES = {"full": ("clip_span", "clip_stock", "po_online", "po_cache", "po_head", "frozen_forward"),
            "lock_text": ("clip_span", "clip_stock", "po_online", "po_cache")}


def po_captions(count: int, context_length: int, generator, full_context: bool = False, words=WORDS):
    """Token rows shaped like PO captions: SOT, ``words`` random word tokens, EOT, zero padding; with
    ``full_context`` words up to the last position, which holds EOT (the whole context is the caption)."""
    rows = torch.zeros(count, context_length, dtype=torch.long)
    for row in rows:
        n = context_length - 2 if full_context else \
            min(int(torch.randint(words[0], words[1] + 1, (1,), generator=generator)), context_length - 2)
        row[0], row[n + 1] = SOT, EOT
        row[1:n + 1] = torch.randint(1, 5000, (n,), generator=generator)
    return rows


def image_size(model) -> int:
    size = model.visual.image_size
    return size if isinstance(size, int) else size[0]


def make_batch(model, batch_size: int, device, *, class_captions: int = 0, full_context: bool = False,
               words=WORDS, seed: int = 0) -> dict:
    """A PO batch on ``device``: random images, y_w and y_l token rows, sample keys. With ``class_captions`` y_w and
    y_l are drawn from that many class prompts (typographic data: captions repeat within a batch)."""
    g = torch.Generator().manual_seed(seed)
    size = image_size(model)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    chosen, rejected = po_captions(2 * batch_size, model.context_length, g, full_context, words).split(batch_size)
    if class_captions:
        prompts = po_captions(class_captions, model.context_length, g, full_context, words)
        chosen, rejected = prompts[torch.randint(class_captions, (2, batch_size), generator=g)]
    return {"images": images.to(device), "chosen": chosen.to(device), "rejected": rejected.to(device),
            "keys": [f"bench/{i}" for i in range(batch_size)]}


@contextlib.contextmanager
def open_clips_full_context(model):
    """open_clip's own text encoder (all context positions) on a model whose text tower runs the caption span."""
    owners = [(model, "encode_text"), (getattr(model, "text", None), "forward")]
    popped = [(owner, name, vars(owner).pop(name)) for owner, name in owners
              if owner is not None and name in vars(owner)]
    try:
        yield
    finally:
        for owner, name, bound in popped:
            setattr(owner, name, bound)


def in_memory_cache(reference_model, batch: dict, autocast) -> CachedReference:
    """A CachedReference over features computed here, as ``python -m open_clip_po.ref_cache`` stores them (float32,
    normalised, on the host)."""
    texts = torch.cat([batch["chosen"], batch["rejected"]])
    with torch.no_grad(), autocast():
        image = reference_model.encode_image(batch["images"], normalize=True).float().cpu()
        unique = torch.unique(texts, dim=0)
        text = reference_model.encode_text(unique, normalize=True).float().cpu()
    logit_scale = float(reference_model.logit_scale.exp())
    cache = RefCache(Path("."), logit_scale, {k: (0, i) for i, k in enumerate(batch["keys"])}, [image],
                     {row.tobytes(): j for j, row in enumerate(unique.cpu().numpy())}, text)
    return CachedReference(cache)


class Step:
    """One step as a callable; ``holds`` are what it keeps between steps (models, optimizer), for memory counts."""

    def __init__(self, fn, holds, text_positions: int, batch_size: int):
        self.fn, self.holds, self.text_positions, self.batch_size = fn, holds, text_positions, batch_size

    def __call__(self):
        self.fn()


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _with_input_dtype(batch: dict, precision: str) -> dict:
    dtype = open_clip.get_input_dtype(precision)
    return batch if dtype is None else {**batch, "images": batch["images"].to(dtype=dtype)}


def _clip_step(model, batch, autocast, optimizer, stock: bool):
    loss_fn = open_clip.ClipLoss()

    def step():
        with open_clips_full_context(model) if stock else contextlib.nullcontext(), autocast():
            out = model(batch["images"], batch["chosen"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _po_step(policy, criterion, batch, autocast, optimizer, clear_memo: bool):
    def step():
        if clear_memo:  # distinct captions never come back in real data: the memo must not help here
            criterion.reference.text_cache.clear()
        with autocast():
            out = criterion(policy, batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def build_family(base, family: str, batch: dict, device, precision: str, wanted=None) -> dict[str, Step]:
    """The steps of ``family`` (see the module docstring) on copies of ``base`` (a CPU model with
    ``output_dict=True``), for ``batch`` (from :func:`make_batch`); only those in ``wanted`` (default: all)."""
    from open_clip_po.towers.attention_layout import contiguous_attention_under_autocast

    wanted = set(FAMILIES[family] if wanted is None else wanted)
    unknown = wanted - set(FAMILIES[family])
    if unknown:
        raise ValueError(f"family {family!r} has no steps {sorted(unknown)}")
    autocast = get_autocast(precision, device_type=torch.device(device).type)
    batch = _with_input_dtype(batch, precision)
    texts = torch.cat([batch["chosen"], batch["rejected"]])
    span, clip_span = caption_span(texts.cpu()), caption_span(batch["chosen"].cpu())
    clear_memo = len(torch.unique(texts, dim=0)) == len(texts)
    lock = family == "lock_text"
    steps = {}

    def lock_text(model):
        if lock:
            model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        return model

    if wanted & {"clip_span", "clip_stock"}:
        clip = lock_text(copy.deepcopy(base).to(device))
        run_text_over_caption_span(clip)
        optimizer = _adamw(clip)
        for name, stock in (("clip_span", False), ("clip_stock", True)):
            if name in wanted:
                steps[name] = Step(_clip_step(clip, batch, autocast, optimizer, stock), [clip, optimizer],
                                   clip.context_length if stock else clip_span, len(batch["keys"]))
    if wanted & {"po_online", "po_cache"}:
        policy = copy.deepcopy(base).to(device)
        run_text_over_caption_span(policy)  # before the reference copy, as ModelSetup does
        reference = make_reference(copy.deepcopy(policy), shares_text=lock)
        lock_text(policy)
        optimizer = _adamw(policy)
        objective = get_loss("dpo")
        if "po_online" in wanted:
            criterion = POCriterion(objective, reference, POSettings(reg_lambda=0.0))
            steps["po_online"] = Step(_po_step(policy, criterion, batch, autocast, optimizer, clear_memo),
                                      [policy, optimizer, reference.model], span, len(batch["keys"]))
        if "po_cache" in wanted:
            cached = in_memory_cache(reference.model, batch, autocast)
            criterion = POCriterion(objective, cached, POSettings(reg_lambda=0.0))
            steps["po_cache"] = Step(_po_step(policy, criterion, batch, autocast, optimizer, False),
                                     [policy, optimizer], span, len(batch["keys"]))
    if wanted & {"po_head", "frozen_forward"}:
        model = copy.deepcopy(base).to(device)
        run_text_over_caption_span(model)
        model.requires_grad_(False)
        contiguous_attention_under_autocast(model)  # as ModelSetup does for the head's frozen passes
        head = attach_linear_head(model).requires_grad_(True)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-5)
        if "po_head" in wanted:
            criterion = POCriterion(get_loss("dpo"), make_reference(is_base_of_head=True), POSettings(reg_lambda=0.0))
            steps["po_head"] = Step(_po_step(model, criterion, batch, autocast, optimizer, False),
                                    [model, optimizer], span, len(batch["keys"]))
        if "frozen_forward" in wanted:
            def frozen_forward():
                with torch.no_grad(), autocast():
                    model.encode_image_base(batch["images"], normalize=True)
                    model.encode_text_base(texts, normalize=True)

            steps["frozen_forward"] = Step(frozen_forward, [model], span, len(batch["keys"]))
    return steps
