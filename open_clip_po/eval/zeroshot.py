"""Zero-shot top-1 on clean and typographically attacked images, and the written-class rate.

``written_rate`` is the fraction of attacked images whose prediction is the class *written* on the
image — the typographic vulnerability itself (paper Table 1/2, Fig. 2).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import open_clip
import torch
from torch import nn

from open_clip_po.atomic import write_json
from open_clip_po.towers.unwrap import unwrap

from .data import NO_WRITTEN_CLASS, EvalSet, open_eval_sets
from .features import encode_images, head_weight, load_eval_model, zero_shot_classifier
from .plots import SINGLE_FIGSIZE, legend_outside, new_figure, run_label, save_figure
from .templates import resolve_templates

log = logging.getLogger(__name__)

TASK = "zeroshot_classification_typographic"


def top1_and_written(logits: torch.Tensor, labels: torch.Tensor, written: torch.Tensor | None = None) -> dict:
    """Top-1 accuracy and, where ``written`` is known (≥ 0), the rate of predicting the written class."""
    predictions = logits.argmax(dim=-1)
    metrics = {"top1": (predictions == labels).float().mean().item(), "n": int(labels.numel())}
    if logits.shape[-1] >= 5:
        top5 = logits.topk(5, dim=-1).indices
        metrics["top5"] = (top5 == labels[:, None]).any(dim=-1).float().mean().item()
    if written is not None:
        known = written != NO_WRITTEN_CLASS
        metrics["n_written"] = int(known.sum())
        metrics["written_rate"] = ((predictions[known] == written[known]).float().mean().item()
                                   if known.any() else float("nan"))
    return metrics


def _input_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def evaluate_model(model: nn.Module, tokenizer, clean: EvalSet, attacked: EvalSet | None, templates: Sequence[str],
                   *, device="cpu", batch_size: int = 64, workers: int = 0) -> dict:
    """Full metrics of the model as it is (head included) on the clean and attacked sets."""
    model = unwrap(model)
    dtype = _input_dtype(model)
    classifier = zero_shot_classifier(model, tokenizer, clean.classnames, templates, device=device)

    def encode(images):
        return model.encode_image(images.to(dtype), normalize=True)

    metrics = {}
    sets = [("clean", clean)] + ([("typographic", attacked)] if attacked is not None else [])
    for prefix, eval_set in sets:
        encoded = encode_images(encode, eval_set, device=device, batch_size=batch_size, workers=workers,
                                desc=f"{prefix} {eval_set.name}")
        result = top1_and_written(encoded["features"] @ classifier, encoded["labels"],
                                  encoded["written"] if eval_set.attacked else None)
        metrics[f"{prefix}_top1"] = result["top1"]
        if "top5" in result:
            metrics[f"{prefix}_top5"] = result["top5"]
        if "written_rate" in result:
            metrics["written_rate"] = result["written_rate"]
            metrics["num_written_known"] = result["n_written"]
        metrics[f"num_{prefix}"] = result["n"]
        metrics[f"skipped_{prefix}"] = encoded["skipped"]
    return metrics


@torch.no_grad()
def typographic_eval(model, tokenizer, preprocess, clean_dir, typographic_dir=None, *, classnames=None,
                     templates=None, device="cpu", batch_size=64, attack_seed=None) -> dict:
    """O/T accuracy for per-epoch logging: ``{"clean_top1", "typographic_top1", "written_rate"}``.

    ``typographic_dir`` is an attacked copy of ``clean_dir`` (same class folders), or pass
    ``attack_seed`` to attack ``clean_dir`` on the fly; without either only ``clean_top1`` comes
    back. ``model`` may be DDP-wrapped or carry a linear head; its train/eval mode is restored.
    Writes no files.
    """
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        clean, attacked = open_eval_sets(str(clean_dir), preprocess,
                                         typographic=None if typographic_dir is None else str(typographic_dir),
                                         attack_seed=attack_seed, classnames=classnames)
        metrics = evaluate_model(inner, tokenizer, clean, attacked, resolve_templates(templates),
                                 device=device, batch_size=batch_size)
    finally:
        inner.train(was_training)
    return {k: metrics[k] for k in ("clean_top1", "typographic_top1", "written_rate") if k in metrics}


def plot_zeroshot(metrics: dict, num_classes: int, title: str, path) -> Path:
    names = [k for k in ("clean_top1", "typographic_top1", "written_rate") if k in metrics]
    labels = {"clean_top1": "clean top-1", "typographic_top1": "attacked top-1", "written_rate": "written-class rate"}
    fig, ax = new_figure(SINGLE_FIGSIZE)
    values = [100 * metrics[k] for k in names]
    bars = ax.bar([labels[k] for k in names], values, color=["tab:blue", "tab:orange", "tab:red"][:len(names)])
    ax.bar_label(bars, fmt="%.1f")
    ax.axhline(100 / num_classes, color="gray", linestyle="--", linewidth=1, label=f"chance ({num_classes} classes)")
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=9)
    legend_outside(ax)
    fig.tight_layout()
    return save_figure(fig, path)


def run_zeroshot(args) -> dict:
    """The ``zeroshot`` subcommand: metrics to ``args.output`` (JSON) and a bar chart beside it (PNG)."""


    templates = resolve_templates(args.template, args.templates_for)
    model, preprocess = load_eval_model(args.model, args.pretrained, weights=args.weights, device=args.device)
    tokenizer = open_clip.get_tokenizer(args.model)
    clean, attacked = open_eval_sets(args.images, preprocess, typographic=args.typographic,
                                     attack_seed=args.seed if args.attack_on_the_fly else None,
                                     classnames_file=args.classnames)
    metrics = evaluate_model(model, tokenizer, clean, attacked, templates, device=args.device,
                             batch_size=args.batch_size, workers=args.workers)
    result = {
        "dataset": args.dataset_name or clean.name,
        "model": args.model,
        "pretrained": args.pretrained,
        "task": TASK,
        "language": "en",
        "weights": args.weights,
        "linear_head": head_weight(model) is not None,
        "templates": templates,
        "num_classes": len(clean.classnames),
        "typographic": None if attacked is None else attacked.description,
        "metrics": metrics,
    }
    output = Path(args.output)
    write_json(result, output)
    title = f"{result['dataset']} — {args.label or run_label(args.pretrained)} ({args.model})"
    plot_zeroshot(metrics, len(clean.classnames), title, output.with_suffix(".png"))
    summary = ", ".join(f"{k} {100 * metrics[k]:.2f}%" for k in ("clean_top1", "typographic_top1", "written_rate")
                        if k in metrics)
    print(f"{summary}  → {output}")
    return result
