"""Mean KL(π_θ ‖ π_ref) on clean images over the class prompts (paper Fig. 5).

π(y|x) = softmax_y(s · I(x)ᵀ T(y)) over one template-averaged prompt per class, each model with
its own logit scale; the same ``policy_logps`` / ``categorical_kl`` as the training regulariser.
Without ``--ref-pretrained`` a head checkpoint is compared with its own backbone (W = I), which is
the reference used in linear-head training.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import open_clip
import torch

from open_clip_po.atomic import write_json
from open_clip_po.losses.logps import policy_logps
from open_clip_po.losses.regulariser import categorical_kl

from .data import open_eval_sets
from .errors import EvalError
from .features import (PromptFeatures, apply_head, base_encoders, class_prompts, encode_images,
                       encode_images_normalized, head_towers, head_weight, load_eval_model, logit_scale, text_side,
                       zero_shot_classifier)
from .plots import SINGLE_FIGSIZE, new_figure, run_label, save_figure
from .templates import resolve_templates


@torch.no_grad()
def kl_per_image(policy_image: torch.Tensor, policy_classifier: torch.Tensor, policy_scale: float,
                 ref_image: torch.Tensor, ref_classifier: torch.Tensor, ref_scale: float,
                 direction: str = "forward") -> torch.Tensor:
    """[N] KLs; image features [N, D] normalised, classifiers [D, C] as built by open_clip."""
    policy = policy_logps(policy_image, policy_classifier.T, policy_scale)
    ref = policy_logps(ref_image, ref_classifier.T, ref_scale)
    return categorical_kl(policy, ref) if direction == "forward" else categorical_kl(ref, policy)


def summarize(kl: torch.Tensor) -> dict:
    n = kl.numel()
    std = kl.std().item() if n > 1 else 0.0
    return {"kl_mean": kl.mean().item(), "kl_std": std, "kl_sem": std / math.sqrt(n), "kl_max": kl.max().item(),
            "n": n}


def plot_kl(labels: Sequence[str], metrics: Sequence[dict], title: str, path) -> Path:
    fig, ax = new_figure(SINGLE_FIGSIZE)
    bars = ax.bar(labels, [m["kl_mean"] for m in metrics], yerr=[m["kl_sem"] for m in metrics], capsize=4,
                  color="tab:purple")
    ax.bar_label(bars, fmt="%.4f", fontsize=8)
    ax.set_ylabel("mean KL(π_θ ‖ π_ref) on clean images")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _kl_to_own_backbone(model, pretrained, label, clean, tokenizer, templates, scale, direction, kw):
    """Per-image KL of a head model to the same backbone without the head: encode once, apply W or not."""

    weight = head_weight(model)
    if weight is None:
        raise EvalError(f"{pretrained} has no linear head: give the reference with --ref-pretrained")
    encode_image, encode_text = base_encoders(model)
    base = encode_images(encode_image, clean, desc=label, **kw)
    prompts = PromptFeatures(encode_text, tokenizer, class_prompts(clean.classnames, templates), kw["device"])
    text_weight = text_side(weight, head_towers(model))
    return kl_per_image(apply_head(base["features"], weight),
                        prompts.classifier(clean.classnames, templates, text_weight),
                        scale, apply_head(base["features"], None),
                        prompts.classifier(clean.classnames, templates, None), scale, direction)


def _kl_to_reference(model, ref, label, clean, tokenizer, templates, scale, args, kw):
    """Per-image KL of a model to a reference given by its image features, classifier and scale."""

    ref_features, ref_classifier, ref_scale = ref
    policy = encode_images_normalized(model, clean, desc=label, **kw)
    if not torch.equal(policy["labels"], ref_features["labels"]):
        raise EvalError("policy and reference read different images (unreadable files differ?)")
    classifier = zero_shot_classifier(model, tokenizer, clean.classnames, templates, args.device)
    return kl_per_image(policy["features"], classifier, scale, ref_features["features"], ref_classifier, ref_scale,
                        args.direction)


def run_kl(args) -> dict:
    """The ``kl`` subcommand: JSON with one entry per checkpoint and a bar chart (PNG)."""


    labels = args.label or [run_label(p) for p in args.pretrained]
    if len(labels) != len(args.pretrained):
        raise EvalError(f"{len(labels)} --label values for {len(args.pretrained)} checkpoints")
    templates = resolve_templates(args.template, args.templates_for)
    tokenizer = open_clip.get_tokenizer(args.model)
    kw = dict(device=args.device, batch_size=args.batch_size, workers=args.workers)

    ref = None
    if args.ref_pretrained:
        ref_model, preprocess = load_eval_model(args.model, args.ref_pretrained, device=args.device)
        clean, _ = open_eval_sets(args.images, preprocess, classnames_file=args.classnames)
        ref_features = encode_images_normalized(ref_model, clean, desc="reference", **kw)
        ref = (ref_features, zero_shot_classifier(ref_model, tokenizer, clean.classnames, templates, args.device),
               logit_scale(ref_model))
        del ref_model

    results = []
    for pretrained, label in zip(args.pretrained, labels):
        model, preprocess = load_eval_model(args.model, pretrained, weights=args.weights, device=args.device)
        clean, _ = open_eval_sets(args.images, preprocess, classnames_file=args.classnames)
        scale = logit_scale(model)
        kl = (_kl_to_own_backbone(model, pretrained, label, clean, tokenizer, templates, scale, args.direction, kw)
              if ref is None else _kl_to_reference(model, ref, label, clean, tokenizer, templates, scale, args, kw))
        results.append({"label": label, "pretrained": pretrained, "metrics": summarize(kl)})
        del model

    direction = "KL(π_θ ‖ π_ref)" if args.direction == "forward" else "KL(π_ref ‖ π_θ)"
    result = {"dataset": args.dataset_name or clean.name, "model": args.model,
              "pretrained": [r["pretrained"] for r in results],
              "ref_pretrained": args.ref_pretrained or "own backbone (no head)", "task": "kl_to_reference",
              "direction": args.direction, "templates": templates, "weights": args.weights,
              "metrics": {r["label"]: r["metrics"] for r in results}, "results": results}
    output = Path(args.output)
    write_json(result, output)
    plot_kl([r["label"] for r in results], [r["metrics"] for r in results],
            f"{direction} — {result['dataset']}, {args.model}", output.with_suffix(".png"))
    for r in results:
        print(f"{r['label']}: mean {direction} = {r['metrics']['kl_mean']:.4e} (n={r['metrics']['n']})")
    print(f"→ {output}")
    return result
