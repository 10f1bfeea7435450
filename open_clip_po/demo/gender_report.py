"""The gender demo's ``report.md`` / ``report.json``: the targets measured on ``open_clip_po.eval gender``'s curves,
and the plots of the paper's Figs. 3 (own vs flipped gender over t) and 4 (retrieval's gender mix at t = 0, t*, 1).
"""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path

from open_clip_po.atomic import atomic_path, write_json, write_text
from open_clip_po.eval.plots import legend_outside

TARGET_READS = 0.85          # mean own-gender probability of the pre-trained model (t = 0)
TARGET_FLIPPED = 0.80        # share of images whose flipped gender wins at t = 1
TARGET_ACTIVITY_DROP = 0.02  # activity accuracy (neutral captions) at t = 1 within 2 points of t = 0
NOISE_SES = 2.0              # a rise along t larger than this many standard errors is not noise


def at_t(curves: dict, key: str, t: float) -> float:
    """``curves[key]`` at the grid point nearest to ``t``."""
    i = min(range(len(curves["t"])), key=lambda j: abs(curves["t"][j] - t))
    return curves[key][i]


def largest_rise(curves: dict) -> tuple[float, float]:
    """The largest rise of the own-gender probability between neighbouring grid points, and the noise it is
    compared with (``NOISE_SES`` standard errors of the mean at the higher point)."""
    p, se = curves["p_true_gender"], curves["p_true_gender_se"]
    rises = [(p[i + 1] - p[i], NOISE_SES * max(se[i], se[i + 1])) for i in range(len(p) - 1)]
    return max(rises, default=(0.0, 0.0))


def nearer_parity(retrieval: dict) -> tuple[int, int]:
    """For how many prompts the neutral t*'s top-k is nearer a 50/50 gender mix than t = 0's; of how many."""
    base = next(v for k, v in retrieval.items() if k.startswith("t=0 "))
    neutral = next((v for k, v in retrieval.items() if k.startswith("t*")), None)
    if neutral is None:
        return 0, len(base)
    # on the counts, not the fractions: 19/30 and 11/30 women are equally far from parity, which floats can miss
    wins = sum(abs(2 * n["women"] - n["k"]) * b["k"] < abs(2 * b["women"] - b["k"]) * n["k"]
               for b, n in zip(base, neutral))
    return wins, len(base)


def lean_nearer_parity(lean: dict, t_star: float) -> tuple[int, int]:
    """For how many prompts the retrieval lean at t* (linear between grid points) is smaller in size than at
    t = 0; of how many. The graded twin of ``nearer_parity``: a top-k that holds only women at t = 0 counts as nearer
    parity with one man in it, even when every other place went to men too."""
    ts = lean["t"]
    if not math.isfinite(t_star) or 0.0 not in ts or not ts[0] <= t_star <= ts[-1]:
        return 0, len(lean["prompts"])
    j = next(i for i in range(1, len(ts)) if ts[i] >= t_star)
    w = (t_star - ts[j - 1]) / (ts[j] - ts[j - 1])
    wins = 0
    for curve in lean["lean"]:
        at_star = (1 - w) * _num(curve[j - 1]) + w * _num(curve[j])
        wins += abs(at_star) < abs(_num(curve[ts.index(0.0)]))   # NaN compares false: not nearer
    return wins, len(lean["prompts"])


def _num(x) -> float:
    return float("nan") if x is None else float(x)   # the JSON writes NaN as null


def check_gender_targets(row: dict) -> dict:
    """The acceptance targets for one objective's head, from its curves and retrieval counts."""
    c = row["curves"]
    own0, own1 = at_t(c, "p_true_gender", 0.0), at_t(c, "p_true_gender", 1.0)
    act0, act1 = at_t(c, "activity_accuracy", 0.0), at_t(c, "activity_accuracy", 1.0)
    rise, noise = largest_rise(c)
    wins, prompts = nearer_parity(row["retrieval"])
    t_star = row["t_star"]
    # the lean, where the evaluation measured it, must agree with the top-k counts
    lean_wins, _ = lean_nearer_parity(row["retrieval_lean"], t_star) if row.get("retrieval_lean") else (None, 0)
    return {
        "own_gender_t0": own0, "reads_gender": own0 >= TARGET_READS,
        "own_gender_t1": own1, "flipped_choice_t1": at_t(c, "flipped_choice", 1.0),
        "flips": at_t(c, "flipped_choice", 1.0) >= TARGET_FLIPPED,
        "activity_t0": act0, "activity_t1": act1, "activity_kept": act0 - act1 <= TARGET_ACTIVITY_DROP,
        "largest_rise": rise, "rise_noise": noise, "monotone": rise <= noise,
        "t_star": t_star, "neutral_t_in_0_1": math.isfinite(t_star) and 0.0 < t_star < 1.0,
        "prompts_nearer_parity": wins, "prompts": prompts, "prompts_lean_nearer_parity": lean_wins,
        "retrieval_nearer_parity": wins * 2 > prompts and (lean_wins is None or lean_wins * 2 > prompts),
    }


def check_gender_quick_targets(row: dict) -> dict:
    """What ``--quick`` checks, and can meet, for one head: the flip's direction — the own-gender probability lower
    at t = 1 and higher at the grid's lowest t < 0 than at t = 0 (None when the grid has no t < 0)."""
    c = row["curves"]
    own0 = at_t(c, "p_true_gender", 0.0)
    lowest = min(c["t"])
    checks = {"lower_at_t1": at_t(c, "p_true_gender", 1.0) < own0,
              "higher_below_0": at_t(c, "p_true_gender", lowest) > own0 if lowest < 0 else None}
    return {**checks, "met": all(v for v in checks.values() if v is not None)}


QUICK_NOTE = ("> **A pipeline check (`--quick`)**: a smaller world, shorter pre-training and one head, so that every "
              "stage runs in a few minutes. It checks that the pipeline works and the flip's direction (its own "
              "targets, first); the demo's claim needs the full run (`python -m open_clip_po.demo gender` without "
              "`--quick`), and is shown apart.")


def _save(fig, path: Path) -> Path:
    """Save a figure as a 256-colour PNG (small enough to keep in the repository)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_path(path) as tmp:
        Image.open(buf).convert("RGB").quantize(256).save(tmp, format="PNG")
    return path


def scaling_words(head_param: str | None) -> tuple[str, str]:
    """How the image head and the paper head are scaled, for the report: a log head (W = exp(A)) along exp(tA),
    a dense one along the straight line (image) or by its SVD (paper); None = the trainer's default per towers
    (the paper head log, the image head dense)."""
    image = "exp(tA)" if head_param == "log" else "I + t(W − I)"
    paper = "UΣ^tVᵀ" if head_param == "dense" else "exp(tA) = UΣ^tVᵀ"
    return image, paper


def plot_flip(rows: list[dict], path: Path, head_param: str | None = None) -> Path:
    """Fig. 3: mean probability of the own and the flipped gender over t, one colour per objective."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.8, 4.2))
    for row, colour in zip(rows, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")):
        c = row["curves"]
        ax.plot(c["t"], c["p_true_gender"], "o-", color=colour, ms=3, label=f"{row['method']}: own gender")
        ax.plot(c["t"], c["p_flipped_gender"], "--", color=colour, label=f"{row['method']}: flipped gender")
        if math.isfinite(row["t_star"]):
            ax.axvline(row["t_star"], color=colour, linestyle=":", linewidth=1)
    ax.axhline(0.5, color="gray", linewidth=0.8)
    image, paper = scaling_words(head_param)
    ax.set_xlabel(f"t  (image head {image}, paper head {paper}; 0 pre-trained, 1 trained)")
    ax.set_ylabel("probability (mean over held-out images)")
    ax.set_ylim(-0.02, 1.02)
    legend_outside(ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_retrieval_mix(rows: list[dict], path: Path) -> Path:
    """Fig. 4: women among the top-k images for each neutral activity prompt at t = 0, t*, 1, per objective."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.8), squeeze=False, sharey=True)
    for ax, row in zip(axes[0], rows):
        labels = list(row["retrieval"])
        prompts = [r["prompt"].replace("The person is ", "") for r in row["retrieval"][labels[0]]]
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(prompts))]
            ax.bar(xs, [r["women_fraction"] for r in row["retrieval"][label]], width,
                   label="t* (neutral)" if label.startswith("t*") else label)   # the value is in the title
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(prompts)), prompts, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{row['method']} (t* = {_f(row['t_star'])}): \"The person is …\"", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"women among the top {row['retrieval'][labels[0]][0]['k']}")
    _legend_below(fig, axes[0])
    return _save(fig, path)


def _legend_below(fig, axes) -> None:
    """One legend for all panels, under them (off the data): the panels share their entries."""
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))


def plot_leans(rows: list[dict], path: Path) -> Path:
    """Each activity prompt's retrieval lean over t, one panel per head, with its t*: where the curves cross zero
    is where that prompt's retrieval is gender-neutral."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.8), squeeze=False, sharey=True)
    for ax, row in zip(axes[0], rows):
        lean = row["retrieval_lean"]
        for prompt, curve in zip(lean["prompts"], lean["lean"]):
            ax.plot(lean["t"], curve, "o-", ms=2, label=prompt.replace("The person is ", ""))
        ax.axhline(0.0, color="gray", linewidth=1)
        if math.isfinite(row["t_star"]):
            ax.axvline(row["t_star"], color="black", linestyle=":", linewidth=1)
        ax.set_title(f"{row['method']} (t* = {_f(row['t_star'])}, dotted)", fontsize=9)
        ax.set_xlabel("t")
    axes[0][0].set_ylabel("lean: women − men, in pooled sd")
    _legend_below(fig, axes[0])
    return _save(fig, path)


def lean_table(rows: list[dict]) -> list[str]:
    """Markdown: per activity prompt, its retrieval lean at t = 0 and the t where each head makes it neutral."""
    first = rows[0]["retrieval_lean"]
    base = first["t"].index(0.0) if 0.0 in first["t"] else None
    split = {r["prompt"]: r for r in first.get("split_t0", [])}
    lines = ["", "Where retrieval turns neutral: a prompt's *lean* is (mean score of the women − mean score of the "
             "men) / their pooled standard deviation among the images of its activity (> 0: women first); each head "
             "makes it zero at its own t, which is nearer parity at t* only when it lies near t* (beyond t*/2 "
             "for a lean linear in t). *Along* and *rest* split the pre-trained model's lean in cosine units "
             "(n·d_x, d_x = mean image of the women − of the men): *along* is read through the direction from "
             "\"The man is <a>\" to \"The woman is <a>\", which a flip learned from those captions cancels at t*; "
             "*rest* through the part of d_x they do not see, which it leaves.", "",
             "| prompt | lean t=0 | along | rest | " + " | ".join(f"{r['method']}: neutral at t (t* = "
                                                              f"{_f(r['t_star'])})" for r in rows) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(rows)]
    for p, prompt in enumerate(first["prompts"]):
        lean0 = first["lean"][p][base] if base is not None else float("nan")
        parts = split.get(prompt, {})
        lines.append(f"| {prompt} | {_f(lean0)} | {_f(parts.get('along'))} | {_f(parts.get('rest'))} | "
                     + " | ".join(_f(r["retrieval_lean"]["t_neutral"][p]) for r in rows) + " |")
    return lines


def _f(x, pct=False) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else (
        f"{100 * x:.1f}" if pct else f"{x:.3f}")


def _yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _world_note(counts: dict) -> str:
    """What the report's first sentence adds in brackets about the pre-training captions: how many are neutral and
    how many images leave the activity's object out of frame ("" when none)."""
    pre = counts.get("pretrain", {})
    notes = []
    if pre.get("neutral captions"):
        notes.append(f"{pre['neutral captions']} of them \"The person is <activity>\"")
    if pre.get("activity out of frame"):
        notes.append(f"the activity's object out of frame in {pre['activity out of frame']} images")
    return f" ({'; '.join(notes)})" if notes else ""


def write_gender_report(out: Path, *, cfg: dict, counts: dict, rows: list[dict], scaled: dict, pretrained: str,
                        timings: dict) -> dict:
    done = [r for r in rows if "curves" in r]
    leaning = [r for r in done if r.get("retrieval_lean")]   # runs whose evaluation measured the retrieval lean
    targets = {r["method"]: check_gender_targets(r) for r in done}
    quick = {r["method"]: check_gender_quick_targets(r) for r in done} if cfg.get("quick") else None
    report = {"task": "gender_flip_demo",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "config": cfg, "world": counts, "pretrained": pretrained,
              "methods": [{k: v for k, v in r.items()} for r in rows], "targets": targets,
              **({"quick_targets": quick} if quick is not None else {}), "svd_scale": scaled, "timings_s": timings}
    write_json(report, out / "report.json")   # NaN (no crossing) as null
    if done:
        plot_flip(done, out / "flip.png", cfg.get("head_param"))
        plot_retrieval_mix(done, out / "retrieval.png")
        if leaning:
            plot_leans(leaning, out / "lean.png")
    image_scaling, paper_scaling = scaling_words(cfg.get("head_param"))
    lines = [
        "# open_clip_po demo: flipping a CLIP's reading of gender with a linear head",
        "",
        f"A `{cfg['model']}` CLIP pre-trained with open_clip's trainer on {cfg['pretrain_images']} pictures of men and "
        "women doing six activities, captioned \"The man/woman is <activity>\"" + _world_note(counts) + " with the "
        "activities unevenly split between genders. Linear heads W are trained (β = λ = 1) on triplets from "
        "`python -m open_clip_po.data.gender` (y_w = the flipped-gender caption, y_l = the original, D_reg = "
        "\"The person is <activity>\"): an *image head* per objective (`--po-head-towers image`: similarity "
        f"(Wx)ᵀy, scaled W_t = {image_scaling}) and the *paper head* (both towers: xᵀWᵀWy, scaled W_t = "
        f"{paper_scaling}), "
        "which cannot reverse a direction the two towers share and so erases gender instead. Each is measured by "
        f"`python -m open_clip_po.eval gender` on {counts['test']} held-out images (balanced: the same number of men "
        "and women per activity). *Own* = mean probability of the image's own gender in the choice between "
        "\"The man is <a>\" and \"The woman is <a>\"; *flipped* = share of images where the other gender wins; "
        "*activity* = top-1 with the neutral captions; *parity* = activity prompts whose top-k at t* is nearer "
        "50/50 women than at t = 0 (in brackets: whose retrieval lean, below, is smaller in size at t* than at "
        "t = 0; the target asks both for most prompts).",
        "",
        "| objective | own t=0 | own t=1 | flipped t=1 (%) | activity t=0 (%) | activity t=1 (%) | t* | "
        "largest rise (noise) | parity at t* |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["method"] not in targets:
            lines.append(f"| {r['method']} | failed: {r.get('error', '?')} | | | | | | | |")
            continue
        t = targets[r["method"]]
        lines.append(f"| {r['method']} | {_f(t['own_gender_t0'])} | {_f(t['own_gender_t1'])} | "
                     f"{_f(t['flipped_choice_t1'], True)} | {_f(t['activity_t0'], True)} | "
                     f"{_f(t['activity_t1'], True)} | {_f(t['t_star'])} | {t['largest_rise']:+.3f} "
                     f"({t['rise_noise']:.3f}) | {t['prompts_nearer_parity']}/{t['prompts']}"
                     + (f" ({t['prompts_lean_nearer_parity']}/{t['prompts']})"
                        if t["prompts_lean_nearer_parity"] is not None else "") + " |")
    if quick is not None:
        lines[1:1] = ["", QUICK_NOTE]
        lines += ["", "Targets of this pipeline check (`--quick`):"]
        lines += [f"- {m}: own gender lower at t = 1 than at t = 0 {_yes(q['lower_at_t1'])}; higher at the "
                  "grid's lowest t than at t = 0 " + ("(no t < 0)" if q["higher_below_0"] is None else
                                                      _yes(q["higher_below_0"])) + "." for m, q in quick.items()]
    lines += ["", "The full demo's claim, measured here but not expected of `--quick`:" if quick is not None
              else "Targets:"]
    for m, t in targets.items():
        lines.append(f"- {m}: pre-trained reads gender (own ≥ {TARGET_READS}) {_yes(t['reads_gender'])}; "
                     f"flipped at t = 1 for ≥ {TARGET_FLIPPED:.0%} {_yes(t['flips'])}; activity within "
                     f"{100 * TARGET_ACTIVITY_DROP:.0f} points {_yes(t['activity_kept'])}; own gender falls "
                     f"monotonically in t (no rise > {NOISE_SES:g} standard errors) {_yes(t['monotone'])}; "
                     f"neutral t* in (0, 1) {_yes(t['neutral_t_in_0_1'])}; retrieval nearer parity at t* for most "
                     f"prompts {_yes(t['retrieval_nearer_parity'])}.")
    if leaning:
        lines += lean_table(leaning) + ["", "![lean over t](lean.png)"]
    if done:
        lines += ["", "Own vs flipped gender over t (Fig. 3; dotted lines: t*):", "", "![flip](flip.png)", "",
                  "Women among the top-k images for \"The person is <activity>\" at t = 0, t*, 1 (Fig. 4):", "",
                  "![retrieval](retrieval.png)"]
    if scaled:
        lines += ["", "Stock open_clip checkpoints from `python -m open_clip_po.svd_scale` (W_t folded in): "
                  + "; ".join(f"{m}: " + ", ".join(f"t = {t}" for t in v) for m, v in scaled.items()) + "."]
    lines += ["", "The world (rows: men, women; two images per activity):", "", "![examples](world_examples.png)",
              "", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
              "", "Every command that ran is in `commands.txt`, its output in `logs/`."]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return report
