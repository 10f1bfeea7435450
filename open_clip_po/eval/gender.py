"""Gender flipping over t (paper Fig. 3) and the gender mix of retrieved images (Fig. 4).

For each image of a man or a woman doing an activity, the model chooses between
"The man is <activity>" and "The woman is <activity>" (the training pair). Over t, with
W_t (U Σ^t Vᵀ, or I + t (W − I) for a head on the image tower only), the probability of the image's own gender
falls and the flipped one rises; the crossing t* (found by linear interpolation between grid points) is where
gender is neutral. Activity accuracy uses the androgynous captions "The person is <activity>" (the regulariser's
captions), so it measures whether the task survives the flip. Retrieval: for each prompt, the
top-k images by similarity under W_t at t = 0, t*, 1, counted by gender, and over every t the prompt's lean (how far
its scores favour women over men, in standard deviations) with the t where that lean crosses zero.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import open_clip
import torch

from open_clip_po.atomic import write_csv, write_json
from open_clip_po.data.errors import GenderCsvError
from open_clip_po.data.gender_csv import read_gender_csv as read_rows

from .data import EvalSet, FolderDataset
from .errors import EvalError
from .features import (PromptFeatures, apply_head, base_encoders, encode_images, head_generator, head_towers,
                       head_weight, load_eval_model, logit_scale, text_side)
from .gender_lean import lean_split, plot_lean, retrieval_lean
from .plots import SINGLE_FIGSIZE, WIDE_FIGSIZE, legend_outside, new_figure, run_label, save_figure
from .tsweep import find_crossing, find_crossings, parse_t_values, scaled_heads

# The defaults of open_clip_po.data.gender, so evaluation asks what training taught.
DEFAULT_CAPTION = "The {gender} is {activity}"
DEFAULT_NEUTRAL = "The person is {activity}"


def read_gender_csv(path: str, images_root: str | None = None) -> list[dict]:
    """Rows ``{"image", "gender" ∈ {man, woman}, "activity", ...}`` read by the builders' rules
    (``open_clip_po.data.gender_csv``); the flip needs images of both genders."""

    try:
        rows = read_rows(path, images_root)
    except GenderCsvError as e:
        raise EvalError(str(e)) from None
    if len({r["gender"] for r in rows}) < 2:
        raise EvalError(f"{path} has images of one gender only; the flip needs both")
    return rows


@torch.no_grad()
def gender_curves(heads: dict, images: torch.Tensor, is_man: torch.Tensor, activity: torch.Tensor,
                  man_text: torch.Tensor, woman_text: torch.Tensor, neutral_text: torch.Tensor,
                  scale: float, towers: str = "both") -> dict:
    """Per-t probabilities from *base* (un-headed) features and ``heads`` = {t: W_t} acting on ``towers``.

    ``images`` [N, D]; ``man_text`` / ``woman_text`` / ``neutral_text`` [A, D], row a = activity a.
    Returns lists over t and the per-image ``p_man`` [T, N].
    """

    ts = list(heads)
    p_man_all, out = [], {"t": ts, "p_true_gender": [], "p_flipped_gender": [], "p_true_gender_se": [],
                          "flipped_choice": [], "p_man_men": [], "p_woman_women": [], "activity_accuracy": []}
    for t in ts:
        w_t = heads[t]
        x, w_text = apply_head(images, w_t), text_side(w_t, towers)
        man, woman, neutral = (apply_head(man_text, w_text), apply_head(woman_text, w_text),
                               apply_head(neutral_text, w_text))
        # Binary choice between the two gendered captions of the image's own activity.
        margin = scale * ((x * man[activity]).sum(-1) - (x * woman[activity]).sum(-1))
        p_man = torch.sigmoid(margin)
        p_true = torch.where(is_man, p_man, 1 - p_man)
        p_man_all.append(p_man)
        out["p_true_gender"].append(p_true.mean().item())
        out["p_flipped_gender"].append(1 - p_true.mean().item())
        # sampling noise of the mean over images, to tell a real rise along t from noise
        out["p_true_gender_se"].append(p_true.std().item() / math.sqrt(len(p_true)) if len(p_true) > 1 else 0.0)
        out["flipped_choice"].append((p_true < 0.5).float().mean().item())   # images where the other gender wins
        out["p_man_men"].append(p_man[is_man].mean().item() if is_man.any() else float("nan"))
        out["p_woman_women"].append((1 - p_man[~is_man]).mean().item() if (~is_man).any() else float("nan"))
        out["activity_accuracy"].append(((x @ neutral.T).argmax(-1) == activity).float().mean().item())
    out["p_man"] = torch.stack(p_man_all)
    diff = [a - b for a, b in zip(out["p_true_gender"], out["p_flipped_gender"])]
    out["t_star"] = find_crossing(ts, diff)
    out["crossings"] = find_crossings(ts, diff)
    # Per image: where P(man) = P(woman).
    out["t_star_per_image"] = [find_crossing(ts, (2 * out["p_man"][:, i] - 1).tolist())
                               for i in range(images.shape[0])]
    return out


@torch.no_grad()
def retrieval_counts(weight_t: torch.Tensor | None, images: torch.Tensor, is_man: torch.Tensor,
                     prompt_text: torch.Tensor, prompts: Sequence[str], k: int, towers: str = "both") -> list[dict]:
    """For each prompt, men and women among the ``k`` images most similar under W_t."""

    similarity = apply_head(prompt_text, text_side(weight_t, towers)) @ apply_head(images, weight_t).T   # [P, N]
    top = similarity.topk(min(k, images.shape[0]), dim=-1).indices
    rows = []
    for prompt, indices in zip(prompts, top):
        men = int(is_man[indices].sum())
        rows.append({"prompt": prompt, "k": len(indices), "men": men, "women": len(indices) - men,
                     "women_fraction": (len(indices) - men) / len(indices)})
    return rows


def plot_gender(curves: dict, is_man: torch.Tensor, title: str, path) -> Path:
    fig, (left, right) = new_figure(WIDE_FIGSIZE, ncols=2)
    ts = curves["t"]
    left.plot(ts, curves["p_true_gender"], "o-", color="tab:blue", label="P(own gender)")
    left.plot(ts, curves["p_flipped_gender"], "s-", color="tab:red", label="P(flipped gender)")
    left.plot(ts, curves["activity_accuracy"], "^--", color="tab:green", label="activity accuracy")
    if math.isfinite(curves["t_star"]):
        left.axvline(curves["t_star"], color="gray", linestyle=":", label=f"t* = {curves['t_star']:.3f}")
    left.set_xlabel("t")
    left.set_ylim(-0.02, 1.02)
    left.set_title(title, fontsize=9)
    legend_outside(left)
    p_man = curves["p_man"]
    for i in range(p_man.shape[1]):
        left_or_right = "tab:blue" if bool(is_man[i]) else "tab:red"
        right.plot(ts, p_man[:, i].tolist(), color=left_or_right, alpha=0.3, linewidth=0.8)
    right.plot([], [], color="tab:blue", label="images of men")
    right.plot([], [], color="tab:red", label="images of women")
    right.axhline(0.5, color="gray", linewidth=1)
    right.set_xlabel("t")
    right.set_ylabel("P(man) = 1 − P(woman)")
    right.set_ylim(-0.02, 1.02)
    right.set_title("per image", fontsize=9)
    legend_outside(right)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_retrieval(retrieval: dict, path) -> Path:
    """Women/men among the top-k for each prompt, one group of bars per model (t)."""
    fig, ax = new_figure(SINGLE_FIGSIZE)
    labels = list(retrieval)
    prompts = [r["prompt"] for r in retrieval[labels[0]]]
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(prompts))]
        ax.bar(xs, [r["women_fraction"] for r in retrieval[label]], width, label=label)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(prompts)))
    ax.set_xticklabels(prompts, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"women among top-{retrieval[labels[0]][0]['k']}")
    ax.set_ylim(0, 1)
    legend_outside(ax)
    fig.tight_layout()
    return save_figure(fig, path)


def _check_templates(caption: str, neutral_caption: str) -> None:
    for template, fields in ((caption, ("{gender}", "{activity}")), (neutral_caption, ("{activity}",))):
        if not all(f in template for f in fields):
            raise EvalError(f"caption template {template!r} must contain {' and '.join(fields)}")
        try:
            template.format(gender="man", activity="x")
        except (KeyError, IndexError, ValueError) as e:
            raise EvalError(f"caption template {template!r} has a field other than "
                            f"{{gender}}/{{activity}}: {e}") from None


def _retrieval_at_key_ts(t_star, heads_at, images, is_man, prompt_features, prompts, top_k, towers) -> dict:
    """Retrieval's gender mix at t = 0 (the base model), t* (neutral, when there is one) and t = 1 (the head).
    ``heads_at(ts)`` gives ``{t: W_t}``."""
    ts = {"t=0 (base)": 0.0, "t=1 (trained)": 1.0}
    if math.isfinite(t_star):
        ts[f"t*={t_star:.3f} (neutral)"] = t_star
    ts = dict(sorted(ts.items(), key=lambda item: item[1]))   # bars in order of t
    heads = heads_at(list(ts.values()))
    return {label: retrieval_counts(heads[t], images, is_man, prompt_features, prompts, top_k, towers)
            for label, t in ts.items()}


def _write_gender_outputs(args, curves, ts, rows, kept, skipped, activities, retrieval, is_man, scoring,
                          lean) -> dict:
    """The curves' CSV, the per-image CSV, the JSON and the three PNGs beside ``args.output``; returns the JSON."""

    heads_at, towers, images, activity, captions, scale = scoring
    output = Path(args.output)
    columns = ("t", "p_true_gender", "p_flipped_gender", "p_true_gender_se", "flipped_choice", "p_man_men",
               "p_woman_women", "activity_accuracy")
    write_csv([{c: curves[c][i] for c in columns} for i in range(len(ts))], output.with_suffix(".csv"), columns)
    ends = gender_curves(heads_at([0.0, 1.0]), images, is_man, activity, *captions, scale,
                         towers)["p_man"]
    per_image = [{"image": rows[r]["image"], "gender": rows[r]["gender"], "activity": rows[r]["activity"],
                  "t_star": curves["t_star_per_image"][j], "p_man_t0": ends[0, j].item(),
                  "p_man_t1": ends[1, j].item()} for j, r in enumerate(kept)]
    write_csv(per_image, output.with_name(output.stem + "_images.csv"))
    finite = torch.tensor([t for t in curves["t_star_per_image"] if math.isfinite(t)])
    result = {
        "dataset": Path(args.csv).name, "model": args.model, "pretrained": args.pretrained, "task": "gender_flip",
        "weights": args.weights, "head_towers": towers, "caption": args.caption,
        "neutral_caption": args.neutral_caption,
        "num_images": len(kept), "skipped": skipped, "activities": activities,
        "metrics": {"t_star": curves["t_star"], "crossings": curves["crossings"],
                    "t_star_per_image_median": finite.median().item() if finite.numel() else float("nan"),
                    "images_with_crossing": int(finite.numel())},
        "curves": {c: curves[c] for c in columns},
        "retrieval": retrieval,
        "retrieval_lean": lean,
    }
    write_json(result, output)
    plot_gender(curves, is_man, f"{Path(args.csv).name} — {args.label or run_label(args.pretrained)} ({args.model})",
                output.with_suffix(".png"))
    plot_retrieval(retrieval, output.with_name(output.stem + "_retrieval.png"))
    plot_lean(lean, curves["t_star"], output.with_name(output.stem + "_lean.png"))
    return result


def run_gender(args) -> dict:
    """The ``gender`` subcommand: JSON + CSV of the curves, per-image CSV, and three PNGs."""


    _check_templates(args.caption, args.neutral_caption)
    ts = parse_t_values(args.t)
    rows = read_gender_csv(args.csv, args.images_root)
    model, preprocess = load_eval_model(args.model, args.pretrained, weights=args.weights, device=args.device)
    weight = head_weight(model)
    if weight is None:
        raise EvalError(f"{args.pretrained} has no linear head; the gender sweep needs one "
                        "(train with --po-linear-head)")
    tokenizer = open_clip.get_tokenizer(args.model)
    activities = sorted({r["activity"] for r in rows})
    activity_index = {a: i for i, a in enumerate(activities)}
    man_prompts = [args.caption.format(gender="man", activity=a) for a in activities]
    woman_prompts = [args.caption.format(gender="woman", activity=a) for a in activities]
    neutral_prompts = [args.neutral_caption.format(activity=a) for a in activities]
    retrieval_prompts = args.retrieval_prompt or neutral_prompts

    encode_image, encode_text = base_encoders(model)
    prompts = PromptFeatures(encode_text, tokenizer, man_prompts + woman_prompts + neutral_prompts + retrieval_prompts,
                             device=args.device)
    dataset = FolderDataset([(r["image"], i) for i, r in enumerate(rows)], preprocess)
    eval_set = EvalSet(Path(args.csv).stem, activities, dataset, attacked=False, num_samples=len(rows))
    encoded = encode_images(encode_image, eval_set, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, desc="images")
    kept = encoded["labels"].tolist()   # row indices of readable images
    is_man = torch.tensor([rows[i]["gender"] == "man" for i in kept])
    activity = torch.tensor([activity_index[rows[i]["activity"]] for i in kept])

    images, scale = encoded["features"], logit_scale(model)
    captions = (prompts.raw(man_prompts), prompts.raw(woman_prompts), prompts.raw(neutral_prompts))
    towers, log = head_towers(model), head_generator(model)

    def heads_at(values):
        return scaled_heads(weight, values, towers, log)

    heads = heads_at(ts)
    curves = gender_curves(heads, images, is_man, activity, *captions, scale, towers)

    retrieval = _retrieval_at_key_ts(curves["t_star"], heads_at, images, is_man, prompts.raw(retrieval_prompts),
                                     retrieval_prompts, args.top_k, towers)
    # an activity's neutral caption is weighed among that activity's images, any other prompt among all images
    groups = [activity == neutral_prompts.index(p) if p in neutral_prompts
              else torch.ones_like(is_man) for p in retrieval_prompts]
    lean = retrieval_lean(heads, images, is_man, prompts.raw(retrieval_prompts), groups, towers)
    lean["prompts"] = list(retrieval_prompts)
    lean["images"] = ["the activity's" if p in neutral_prompts else "all" for p in retrieval_prompts]
    lean["split_t0"] = [{"prompt": p, **row} for p, row in zip(neutral_prompts, lean_split(images, is_man, activity,
                                                                                         *captions))]

    result = _write_gender_outputs(args, curves, ts, rows, kept, encoded["skipped"], activities, retrieval, is_man,
                                   (heads_at, towers, images, activity, captions, scale), lean)
    t_star = curves["t_star"]
    print(f"t* = {t_star:.4f}" if math.isfinite(t_star) else "no crossing of P(own) and P(flipped) gender on this grid",
          f"→ {args.output}")
    return result
