"""``DIR/report.md`` and ``DIR/report.json``: the demo's Table-1-like results, the targets, and the plots."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from open_clip_po.atomic import atomic_path, write_text

PO_LOSSES = ("dpo", "ipo", "kto")
TARGET_ATTACKED_GAIN = 0.30   # attacked accuracy up by >= 30 points over the pre-trained model ...
TARGET_CLEAN_DROP = 0.02      # ... with clean accuracy down by <= 2 points, for at least one PO objective


def check_targets(rows: list[dict]) -> dict:
    """The demo's targets, measured on ``rows`` (first row = the pre-trained model)."""
    pre = rows[0]
    done = [r for r in rows[1:] if "attacked" in r]
    po = [r for r in done if r["loss"] in PO_LOSSES]
    gains = {r["method"]: {"attacked_gain": r["attacked"] - pre["attacked"], "clean_drop": pre["clean"] - r["clean"]}
             for r in po}
    robust = [m for m, g in gains.items()
              if g["attacked_gain"] >= TARGET_ATTACKED_GAIN and g["clean_drop"] <= TARGET_CLEAN_DROP]
    closer = {}
    for ce in (r for r in done if r["loss"] == "ce" and "kl_to_ref" in r):
        for r in po:
            if r["head"] == ce["head"] and "kl_to_ref" in r:
                closer[f"{r['method']} vs {ce['method']}"] = r["kl_to_ref"] < ce["kl_to_ref"]
    return {
        "attacked_gain_and_clean_drop": gains,
        "robust_methods": robust,
        "robust_met": bool(robust),
        "po_closer_to_reference_than_ce": closer,
        "closer_met": bool(closer) and all(closer.values()),
        "po_beats_pretrained_on_attacked": any(r["attacked"] > pre["attacked"] for r in po),
        "pretrained_reads": pre["written_rate"],
    }


def check_quick_targets(rows: list[dict]) -> dict:
    """What ``--quick`` checks, and can meet: a pipeline check. Its pre-trained model has only begun to read, so the
    full demo's claim (``check_targets``) is measured but not expected; these are (first row = pre-trained):
    every run finished, the attack costs the pre-trained model accuracy, and some PO objective raises attacked
    accuracy and lowers the written-class rate."""
    pre = rows[0]
    po = [r for r in rows[1:] if "attacked" in r and r["loss"] in PO_LOSSES]
    checks = {
        "every_run_finished": all("attacked" in r for r in rows),
        "attack_costs_pretrained": pre["attacked"] < pre["clean"],
        # None: no PO run to judge (e.g. --pretrain-only)
        "po_raises_attacked": any(r["attacked"] > pre["attacked"] for r in po) if po else None,
        "po_reads_less": any(r["written_rate"] < pre["written_rate"] for r in po) if po else None,
    }
    return {**checks, "met": all(v for v in checks.values() if v is not None)}


def _verdict(ok: bool | None) -> str:
    return "no PO run" if ok is None else f"**{'met' if ok else 'not met'}**"


QUICK_TARGET_TEXT = {
    "every_run_finished": "every fine-tuning run finished and was evaluated",
    "attack_costs_pretrained": "the attack costs the pre-trained model accuracy (attacked < clean)",
    "po_raises_attacked": "a PO objective raises attacked accuracy over the pre-trained model's",
    "po_reads_less": "a PO objective lowers the written-class rate",
}
def knob_checks(rows: list[dict], clean_drop: float = TARGET_CLEAN_DROP) -> dict:
    """What the t-sweep of a head shows (``rows`` of ``eval sweep``, one of them at t = 0): whether the written-class
    rate falls monotonically in t, the rate at t = −1 against t = 0 (the model reads more when the head is turned
    around), the largest clean-accuracy drop over t ∈ [−1, 2], and the t ∈ [0, 3] with the most attacked accuracy
    among those that keep clean accuracy within ``clean_drop`` of t = 0."""
    rows = sorted(rows, key=lambda r: r["t"])
    by_t = {r["t"]: r for r in rows}
    base = by_t[0.0]
    written = [r["written_rate"] for r in rows]
    kept = [r for r in rows if 0 <= r["t"] <= 3 and r["clean_top1"] >= base["clean_top1"] - clean_drop]
    best = max(kept, key=lambda r: r["typographic_top1"])
    return {
        "written_monotone": all(b <= a for a, b in zip(written, written[1:])),
        "written_largest_rise": max([0.0] + [b - a for a, b in zip(written, written[1:])]),
        "written_at_minus_1": by_t[-1.0]["written_rate"] if -1.0 in by_t else None,
        "written_at_0": base["written_rate"],
        "clean_largest_drop_minus1_to_2": base["clean_top1"] - min(r["clean_top1"] for r in rows
                                                                  if -1 <= r["t"] <= 2),
        "best_t": best["t"], "best_attacked_gain": best["typographic_top1"] - base["typographic_top1"],
        "best_clean_change": best["clean_top1"] - base["clean_top1"],
    }


def _sweep_lines(sweep: dict) -> list[str]:
    lines = ["", f"t-sweep of the {sweep['method']} model (W_t = exp(tA) = UΣ^tVᵀ for the default log head; t = 0 is "
                 "the pre-trained model, t = 1 the trained head, t < 0 turns it around):", "",
             "| t | clean | attacked | written-class rate |", "|---:|---:|---:|---:|"]
    for r in sorted(sweep["rows"], key=lambda r: r["t"]):
        lines.append(f"| {r['t']:g} | {_pct(r['clean_top1'])} | {_pct(r['typographic_top1'])} | "
                     f"{_pct(r['written_rate'])} |")
    if any(r["t"] == 0 for r in sweep["rows"]):
        k = knob_checks(sweep["rows"])
        minus_1 = "" if k["written_at_minus_1"] is None else (
            f"at t = −1 it reads {_pct(k['written_at_minus_1'])} % (t = 0: {_pct(k['written_at_0'])} %); ")
        lines += ["", f"Written-class rate monotone in t: **{'yes' if k['written_monotone'] else 'no'}** (largest "
                      f"rise {_pct(k['written_largest_rise'])} points); {minus_1}clean accuracy at most "
                      f"{_pct(k['clean_largest_drop_minus1_to_2'])} points below t = 0 over t ∈ [−1, 2]; best "
                      f"t ∈ [0, 3] with clean down ≤ 2 points: t = {k['best_t']:g}, attacked "
                      f"{100 * k['best_attacked_gain']:+.1f}, clean {100 * k['best_clean_change']:+.1f}."]
    return lines + ["", "![t-sweep](eval/tsweep.png)"]


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def plot_table(rows: list[dict], path: Path) -> Path:
    """Grouped bars: clean / attacked accuracy and written-class rate per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in rows if "attacked" in r]
    x = np.arange(len(done))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(done)), 3.6), dpi=100)
    for i, (key, label) in enumerate((("clean", "clean top-1 (O)"), ("attacked", "attacked top-1 (T)"),
                                      ("written_rate", "written-class rate"))):
        ax.bar(x + (i - 1) * 0.27, [100 * r[key] for r in done], width=0.27, label=label)
    ax.set_xticks(x, [r["method"] for r in done], rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _intro_and_table(cfg: dict, rows: list[dict]) -> list[str]:
    """The report's opening paragraph and its table of methods (Δ against the pre-trained model, row 0)."""
    pre = rows[0]
    lines = [
        "# open_clip_po demo: preference optimisation against typographic attacks",
        "",
        f"A `{cfg['model']}` CLIP pre-trained with open_clip's trainer on a synthetic world of "
        f"{cfg['num_classes']} classes (coloured shapes named by single words), where a share of the images "
        "show the class name written on them, then fine-tuned on typographic preference triplets "
        "(x = an image with a wrong class name written on it, y_w = the true class prompt, y_l = the written "
        "class prompt) through `torchrun -m open_clip_po.main`. Accuracies on held-out images; "
        "*attacked* = the same images with a wrong class name written on them; *written-class rate* = how often "
        "the model predicts the written class; KL = mean KL(π_θ‖π_ref) over the class prompts on clean images.",
        "",
        "| method | clean (O) | attacked (T) | written-class rate | KL to reference | Δ attacked | Δ clean |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "attacked" not in r:
            lines.append(f"| {r['method']} | failed: {r.get('error', '?')} | | | | | |")
            continue
        kl = r.get("kl_to_ref")
        d_att = "" if r is pre else f"{100 * (r['attacked'] - pre['attacked']):+.1f}"
        d_clean = "" if r is pre else f"{100 * (r['clean'] - pre['clean']):+.1f}"
        lines.append(f"| {r['method']} | {_pct(r['clean'])} | {_pct(r['attacked'])} | {_pct(r['written_rate'])} | "
                     f"{'—' if kl is None else f'{kl:.3g}'} | {d_att} | {d_clean} |")
    return lines


QUICK_NOTE = ("> **A pipeline check (`--quick`)**: a small world and short training, so that every stage runs in a "
              "few minutes. Its pre-trained model has only begun to read, so the numbers below check that the "
              "pipeline works and that PO moves the model the right way; the demo's claim needs the full run "
              "(`python -m open_clip_po.demo` without `--quick`).")


def write_report(out: Path, *, cfg: dict, counts: dict, rows: list[dict], sweep: dict | None,
                 timings: dict) -> dict:
    targets = check_targets(rows)
    quick = bool(cfg.get("quick"))
    report = {
        "task": "typographic_attack_demo",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "config": cfg,
        "world": counts,
        "methods": rows,
        "targets": targets,
        **({"quick_targets": check_quick_targets(rows)} if quick else {}),
        "sweep": None if sweep is None else {"method": sweep["method"], "rows": sweep["rows"],
                                             "head": sweep.get("head"),
                                             "knob": knob_checks(sweep["rows"]) if any(
                                                 r["t"] == 0 for r in sweep["rows"]) else None},
        "timings_s": timings,
    }
    write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    plot_table(rows, out / "report_table.png")

    lines = _intro_and_table(cfg, rows)
    if quick:
        lines[1:1] = ["", QUICK_NOTE]
        lines += ["", "Targets of this pipeline check (`--quick`):"]
        lines += [f"- {text} — {_verdict(report['quick_targets'][k])}" for k, text in QUICK_TARGET_TEXT.items()]
    lines += [
        "",
        ("The full demo's claim, measured here but not expected of `--quick`: " if quick else "Targets: ")
        + "attacked accuracy up ≥ 30 points with clean accuracy down ≤ 2 points for at least one "
        f"PO objective — **{'met' if targets['robust_met'] else 'not met'}**"
        + (f" ({', '.join(targets['robust_methods'])})" if targets["robust_methods"] else "")
        + "; PO closer to the reference than CE — "
        f"**{'met' if targets['closer_met'] else 'not met'}**"
        + (" (" + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in targets["po_closer_to_reference_than_ce"].items())
           + ")" if targets["po_closer_to_reference_than_ce"] else "") + ".",
        "",
        "![accuracy per method](report_table.png)",
    ]
    if (out / "eval" / "kl.png").exists():
        lines += ["", "![KL to the reference](eval/kl.png)"]
    if sweep is not None:
        lines += _sweep_lines(sweep)
    if (out / "world_examples.png").exists():
        lines += ["", "The world (rows: objects, labelled objects, words only, signs — a word beside another object, "
                      "captioned by the word — and attacked test images):", "",
                  "![examples](world_examples.png)"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
              "", "Every command that ran is in `commands.txt`, its output in `logs/`."]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return report
