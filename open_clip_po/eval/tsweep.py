"""The t-sweep (paper Fig. 2): one head checkpoint evaluated at W_t for many t (U Σ^t Vᵀ; exp(t A) for a
log-parameterised head W = exp(A); I + t (W − I) for a dense head on the image tower only; see
``open_clip_po.surgery.scale_head``), no files.

Backbone features of the images and prompts are computed once; each t only applies W_t and
re-normalises, which is exact because the head is linear and sits after the backbone.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import open_clip
import torch

from open_clip_po.atomic import write_csv, write_json
from open_clip_po.surgery import head_stats, scale_head

from .data import open_eval_sets
from .errors import EvalError
from .features import (PromptFeatures, apply_head, base_encoders, class_prompts, encode_images, head_generator,
                       head_towers, head_weight, load_eval_model, text_side)
from .plots import WIDE_FIGSIZE, legend_outside, new_figure, run_label, save_figure
from .templates import resolve_templates
from .zeroshot import top1_and_written

SWEEP_COLUMNS = ("t", "clean_top1", "typographic_top1", "written_rate")


def parse_t_values(spec: str) -> list[float]:
    """``"start:stop:step"`` (stop included) or ``"a,b,c"``, e.g. ``-4:4:0.5`` → -4, -3.5, …, 4."""
    try:
        if ":" in spec:
            parts = [float(p) for p in spec.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise EvalError(f"--t {spec}: need start <= stop and step > 0")
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise EvalError(f"--t {spec!r}: expected start:stop:step (e.g. -4:4:0.5) or a comma list") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise EvalError(f"--t {spec!r}: no finite values")
    return values


def find_crossings(ts: Sequence[float], diff: Sequence[float]) -> list[float]:
    """Every t where ``diff`` is zero or changes sign, linearly interpolated between grid points."""
    ts, diff = [float(t) for t in ts], [float(d) for d in diff]
    crossings = []
    for i in range(len(ts)):
        if diff[i] == 0.0:
            crossings.append(ts[i])
        elif i + 1 < len(ts) and diff[i] * diff[i + 1] < 0:
            crossings.append(ts[i] + (ts[i + 1] - ts[i]) * diff[i] / (diff[i] - diff[i + 1]))
    return crossings


def find_crossing(ts: Sequence[float], diff: Sequence[float], start: float = 0.0) -> float:
    """The crossing met first when moving from t = ``start`` (the base model) towards the trained head;
    if there is none above ``start``, the nearest below it; NaN if ``diff`` never changes sign."""
    crossings = find_crossings(ts, diff)
    above = [t for t in crossings if t >= start]
    if above:
        return min(above)
    return max(crossings) if crossings else float("nan")


def head_summary(weight: torch.Tensor) -> dict:
    """How far W is from orthogonal (paper App. E / Fig. 8): singular values and ‖WᵀW − I‖."""

    return head_stats(weight.detach().float().cpu())


def scaled_heads(weight: torch.Tensor, ts: Sequence[float], towers: str = "both",
                 log: torch.Tensor | None = None) -> dict[float, torch.Tensor]:
    """``{t: W_t}``; ``log`` is the generator of a log-parameterised head (W = exp(log)), else None."""
    log = None if log is None else log.detach().float().cpu()
    return {t: scale_head(weight.detach().float().cpu(), t, towers, log) for t in ts}


@torch.no_grad()
def tsweep_metrics(weight: torch.Tensor, ts: Sequence[float], prompts, classnames, templates,
                  clean: dict, attacked: dict | None = None, towers: str = "both",
                  log: torch.Tensor | None = None) -> list[dict]:
    """One row per t: clean/attacked top-1 and written-class rate under W_t.

    ``clean`` / ``attacked`` are ``encode_images`` results of the *base* (un-headed) image encoder;
    ``prompts`` a ``PromptFeatures`` of the base text encoder holding every class prompt.
    """

    rows = []
    for t, w_t in scaled_heads(weight, ts, towers, log).items():
        classifier = prompts.classifier(classnames, templates, text_side(w_t, towers))
        row = {"t": t, "clean_top1": top1_and_written(apply_head(clean["features"], w_t) @ classifier,
                                                      clean["labels"])["top1"]}
        if attacked is not None:
            result = top1_and_written(apply_head(attacked["features"], w_t) @ classifier, attacked["labels"],
                                      attacked["written"])
            row["typographic_top1"] = result["top1"]
            row["written_rate"] = result["written_rate"]
        rows.append(row)
    return rows


def plot_sweep(rows: Sequence[dict], title: str, path) -> Path:
    """Left: clean and attacked top-1 and the written-class rate vs t; right: their frontier, attacked top-1 vs
    written-class rate (Fig. 2: reading against seeing)."""
    fig, (left, right) = new_figure(WIDE_FIGSIZE, ncols=2)
    ts = [r["t"] for r in rows]
    left.plot(ts, [100 * r["clean_top1"] for r in rows], "o--", color="tab:blue", label="clean top-1")
    if "typographic_top1" in rows[0]:
        left.plot(ts, [100 * r["typographic_top1"] for r in rows], "o-", color="tab:orange", label="attacked top-1")
        left.plot(ts, [100 * r["written_rate"] for r in rows], "s-", color="tab:red", label="written-class rate")
        right.plot([100 * r["written_rate"] for r in rows], [100 * r["typographic_top1"] for r in rows], "-",
                   color="gray", linewidth=1)
        points = right.scatter([100 * r["written_rate"] for r in rows], [100 * r["typographic_top1"] for r in rows],
                               c=ts, cmap="viridis", zorder=3)
        fig.colorbar(points, ax=right, label="t")
        right.set_xlabel("written-class rate (%)")
        right.set_ylabel("attacked top-1 (%)")
        right.set_title("frontier: attacked top-1 vs written-class rate", fontsize=9)
    else:
        right.text(0.5, 0.5, "no attacked images:\nno frontier", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    left.axvline(0, color="lightgray", linewidth=1)
    left.axvline(1, color="lightgray", linewidth=1)
    left.set_xlabel("t (scaled head W_t; 0 = base model, 1 = trained head)")
    left.set_ylabel("%")
    left.set_title(title, fontsize=9)
    legend_outside(left)
    fig.tight_layout()
    return save_figure(fig, path)


def run_tsweep(args) -> dict:
    """The ``tsweep`` subcommand: CSV + JSON rows per t and the Fig. 2 PNG."""


    ts = parse_t_values(args.t)
    templates = resolve_templates(args.template, args.templates_for)
    model, preprocess = load_eval_model(args.model, args.pretrained, weights=args.weights, device=args.device)
    weight = head_weight(model)
    if weight is None:
        raise EvalError(f"{args.pretrained} has no linear head; the sweep needs one (train with --po-linear-head)")
    tokenizer = open_clip.get_tokenizer(args.model)
    clean, attacked = open_eval_sets(args.images, preprocess, typographic=args.typographic,
                                     attack_seed=args.seed if args.attack_on_the_fly else None,
                                     classnames_file=args.classnames)
    encode_image, encode_text = base_encoders(model)
    prompts = PromptFeatures(encode_text, tokenizer, class_prompts(clean.classnames, templates), device=args.device)
    kw = dict(device=args.device, batch_size=args.batch_size, workers=args.workers)
    clean_features = encode_images(encode_image, clean, desc=f"clean {clean.name}", **kw)
    attacked_features = None if attacked is None else encode_images(encode_image, attacked, desc="attacked", **kw)
    towers, log = head_towers(model), head_generator(model)
    rows = tsweep_metrics(weight, ts, prompts, clean.classnames, templates, clean_features, attacked_features, towers,
                         log)

    output = Path(args.output)
    columns = [c for c in SWEEP_COLUMNS if c in rows[0]]
    write_csv(rows, output.with_suffix(".csv"), columns)
    result = {"dataset": args.dataset_name or clean.name, "model": args.model, "pretrained": args.pretrained,
              "task": "typographic_t_sweep", "weights": args.weights, "templates": templates,
              "typographic": None if attacked is None else attacked.description,
              "num_clean": int(clean_features["labels"].numel()),
              "num_typographic": None if attacked_features is None else int(attacked_features["labels"].numel()),
              "head": {**head_summary(weight), "towers": towers, "param": "dense" if log is None else "log"},
              "rows": rows}
    write_json(result, output)
    plot_sweep(rows, f"{result['dataset']} — {args.label or run_label(args.pretrained)} ({args.model})",
               output.with_suffix(".png"))
    print(f"{len(rows)} values of t from {ts[0]} to {ts[-1]} → {output}, {output.with_suffix('.csv')}")
    return result
