"""The GPU benchmark's outputs: the JSON, a PNG beside it, and its section of BENCHMARKS.md (the others kept)."""
from __future__ import annotations

import json
from pathlib import Path

from open_clip_po.atomic import atomic_path, write_text
from run import _sections

STEP_LABELS = {"clip_span": "CLIP step over the caption span",
               "clip_stock": "open_clip's stock CLIP step (full context)",
               "po_online": "PO, online reference", "po_cache": "PO, reference cache",
               "po_head": "PO, linear head (baseline: the frozen forward)", "frozen_forward": "frozen-backbone forward"}
FAMILY_LABELS = {"full": "full fine-tune", "lock_text": "--lock-text"}


def section_name(device_type: str, quick: bool) -> str:
    return "gpu" if device_type == "cuda" and not quick else f"gpu ({device_type}{', quick' if quick else ''})"


def _num(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _mb(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def _model_table(model: dict) -> list[str]:
    if model["batch_size"] is None:
        return [f"### {model['model']}", "", f"Not measured: {'; '.join(model['notes'])}.", ""]
    positions = {r["step"]: r["text_positions"] for r in model["ratios"]}
    lines = [f"### {model['model']}, batch {model['batch_size']}", "",
             f"Text tower over {positions['po_online']} positions (stock CLIP: all {model['context_length']})"
             + (f"; {'; '.join(model['notes'])}" if model["notes"] else "") + ".", "",
             "| step | ms | samples/s | peak MB | time / baseline | FLOPs / baseline | time / stock CLIP | "
             "FLOPs / stock CLIP | peak memory / CLIP over the span |", "|---|---|---|---|---|---|---|---|---|"]
    for r in model["ratios"]:
        lines.append(f"| {FAMILY_LABELS[r['family']]}: {STEP_LABELS[r['step']]} | {r['ms']:.1f} | "
                     f"{r['samples_per_s']:.0f} | {_mb(r['peak_mb'])} | {r['time_vs_baseline']:.3f} | "
                     f"{r['flops_vs_baseline']:.3f} | {r['time_vs_stock']:.3f} | {r['flops_vs_stock']:.3f} | "
                     f"{_num(r['memory_vs_clip_span'])} |")
    return lines + [""]


def _data_rows(report: dict) -> list[str]:
    run, cache, reader = report["training_run"], report["cache_build"], report["reader"]
    loss = f"{run['losses'][0]:.4g} → {run['losses'][-1]:.4g}" if run["losses"] else "none logged"
    kl = f"{min(run['reg_kls']):.3g}–{max(run['reg_kls']):.3g}" if run["reg_kls"] else "none logged"
    group = "a process group" if run["process_group"] else "no process group (one process: open_clip needs " \
                                                            "WORLD_SIZE > 1)"
    return ["| data and training | value | details |", "|---|---|---|",
            f"| reference-cache build (`python -m open_clip_po.ref_cache`) | {cache['samples_per_s']:.0f} samples/s | "
            f"{cache['samples']} samples (triplets and clean pairs), {cache['first_s']:.1f} s, a rerun that finds "
            f"every shard done {cache['rerun_s']:.1f} s; one decoding process |",
            f"| triplet reader, {reader['workers']} workers | {reader['samples_per_s']:.0f} samples/s | epochs 2–4 "
            f"(persistent workers); with worker start-up {reader['samples_per_s_with_startup']:.0f}/s; batch "
            f"{reader['batch_size']}, {reader['image_size']} px JPEG, open_clip's train transform |",
            f"| {len(run['losses'])}-step `torchrun --nproc_per_node {run['processes']} -m open_clip_po.main`, "
            f"{report['precision']}, {run['backend']} | {'finite' if run['finite'] else '**not finite**'} | loss "
            f"{loss}, reg_kl {kl}; {run['samples_per_s']:.0f} samples/s with data loading ({run['workers']} "
            f"workers, batch {run['batch_size']}); {group}; {run['seconds']:.0f} s in all |", ""]


def markdown_section(report: dict, name: str, json_path: Path) -> str:
    lines = [f"## {name}", "",
             f"Measured {report['measured']} on {report['device']}; torch {report['torch']}, open_clip "
             f"{report['open_clip']}; `{report['command']}` took {report['total_s'] / 60:.1f} min. "
             f"{report['precision']}, random weights, distinct PO-length captions. Step rows are medians of "
             f"{report['plan']['repeats']} interleaved repeats after warm-up; the baseline of each ratio is the CLIP "
             "step over the same caption span (of the linear head: the frozen-backbone forward), whose FLOP ratio is "
             "the floor of the time ratio; peak = the step's resident tensors + the rise of max_memory_allocated over "
             f"one step. What limits each figure: `benchmarks/gpu.py`. All figures: `{json_path.name}` (and a plot "
             "beside it).", ""]
    for model in report["models"]:
        lines += _model_table(model)
    return "\n".join(lines + _data_rows(report))


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in report["models"] if m["batch_size"] is not None]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        labels = [f"{FAMILY_LABELS[r['family']]}\n{r['step']}" for r in model["ratios"]]
        for ax, key, title in ((row[0], "samples_per_s", "samples/s"), (row[1], "peak_mb", "peak memory, MB")):
            ax.bar(range(len(labels)), [r[key] or 0 for r in model["ratios"]],
                   color=["tab:gray" if r["step"].startswith(("clip", "frozen")) else "tab:blue"
                          for r in model["ratios"]])
            ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{model['model']}, batch {model['batch_size']}: {title}", fontsize=9)
    fig.suptitle(f"{report['device']}, {report['precision']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(report: dict, json_path: Path, markdown: Path | None, name: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(json_path, json.dumps(report, indent=1))
    _plot(report, json_path.with_suffix(".png"))
    if markdown is None:
        return
    old = markdown.read_text() if markdown.exists() else "# Benchmarks\n"
    header, sections = _sections(old)
    sections[name] = markdown_section(report, name, json_path)
    note = f"Section {name} measured {report['measured']} (`{report['command']}`)."
    header = header.rstrip("\n") + "\n" + note + "\n"
    write_text(markdown, header + "\n" + "\n".join(s.rstrip("\n") + "\n" for s in sections.values()))
