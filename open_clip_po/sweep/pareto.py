"""A sweep's report: every run's settings and metrics, and the Pareto front of clean vs attacked accuracy.

Reads RUNS_DIR/sweep.json (the plan written by ``python -m open_clip_po.sweep`` or ``scripts/slurm/sweep.sh``) and
each run's completion record RUNS_DIR/NAME/eval.json; runs without one are listed as failed (failed.json: stage,
error, log) or missing (not started, interrupted or still running), never left out.

Front: both accuracies are maximised. A run is on the front when no other run is at least as good on both and
strictly better on one. Runs with the same (clean, attacked) pair do not dominate each other, so equal runs are
all on the front or all off it; a run equal to another on one accuracy and worse on the other is dominated.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

from open_clip_po.atomic import write_csv, write_json, write_text
from open_clip_po.eval.errors import EvalError
from open_clip_po.eval.plots import new_figure, save_figure

from .evaluate import RunEvalError, data_args, eval_cli
from .runs import DONE, FAILED, PLAN, read_plan, run_status
from .spec import Run

METRICS = ("clean_top1", "typographic_top1", "written_rate", "kl_to_ref")
PARETO_FIGSIZE = (9.6, 7.2)
LABEL_LIMIT = 24  # above this many runs only the front is labelled in the plot


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """``on_front[i]``: no other point is >= points[i] in both coordinates and > in one (both maximised)."""
    def dominates(p, q):
        return p[0] >= q[0] and p[1] >= q[1] and (p[0] > q[0] or p[1] > q[1])

    return [not any(dominates(p, q) for p in points) for q in points]


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(runs_dir: Path) -> tuple[dict, list[dict]]:
    """(the plan's grid or {}, one row per run: name, status, settings, metrics, error, log)."""
    runs_dir = Path(runs_dir)
    plan = _read(runs_dir / PLAN) or {}
    planned = plan.get("runs", [])
    names = [r["name"] for r in planned]
    # Finished runs of an earlier plan of the same folder are reported too.
    names += sorted(p.parent.name for p in runs_dir.glob(f"*/{DONE}") if p.parent.name not in names)
    if not names:
        raise EvalError(f"{runs_dir}: no sweep plan ({PLAN}) and no run with an {DONE}")
    settings_of = {r["name"]: r["settings"] for r in planned}
    flags_of = {r["name"]: r["flags"] for r in planned}
    rows = []
    for name in names:
        status = run_status(runs_dir, name)
        row = {"name": name, "status": status if name in settings_of else f"{status} (not in the plan)",
               "settings": settings_of.get(name, {}), "flags": flags_of.get(name, {})}
        if status == "done":
            record = _read(runs_dir / name / DONE)
            row.update(settings=record.get("settings", row["settings"]), flags=record.get("flags", row["flags"]),
                       metrics=record["metrics"], t_sweep=record.get("t_sweep"))
        elif status == "failed":
            failure = _read(runs_dir / name / FAILED) or {}
            row.update(error=f"{failure.get('stage', '?')}: {failure.get('error', '?')}", log=failure.get("log"))
        elif status == "broken":
            row.update(error="started, no record yet (running, or interrupted)", log=str(runs_dir / name))
        else:
            row.update(error="not started")
        rows.append(row)
    done = [r for r in rows if "metrics" in r]
    front = pareto_front([(r["metrics"]["clean_top1"], r["metrics"]["typographic_top1"]) for r in done])
    for row, on_front in zip(done, front):
        row["pareto"] = on_front
    return plan.get("grid", {}), rows


def reference_point(runs_dir: Path, evaluate: bool) -> dict | None:
    """Zero-shot metrics of the reference the runs start from ([eval] reference, else base pretrained), evaluated
    once and kept in RUNS_DIR/reference/; None when the grid names none or the runs start from different ones."""
    try:
        grid_obj, runs = read_plan(runs_dir)
    except FileNotFoundError:
        return None
    refs = {(str(r.flags.get("model")), str(grid_obj.eval.get("reference", r.flags.get("pretrained")))) for r in runs}
    if len(refs) != 1 or "None" in next(iter(refs)):
        return None
    model, reference = next(iter(refs))
    slug = re.sub(r"[^A-Za-z0-9.-]", "_", Path(reference).name)
    key = hashlib.sha1(json.dumps([model, reference, grid_obj.eval], sort_keys=True).encode()).hexdigest()[:8]
    output = Path(runs_dir) / "reference" / f"{slug}-{key}.json"
    if not output.exists():
        if not evaluate:
            return None
        argv = data_args(grid_obj, Run(-1, "reference", {}, {"model": model}))
        try:
            eval_cli(["zeroshot", "--pretrained", reference, *argv, "--output", str(output)])
        except RunEvalError as e:
            raise EvalError(f"evaluating the reference: {e}") from None
    metrics = json.loads(output.read_text(encoding="utf-8"))["metrics"]
    return {"name": f"reference ({Path(reference).name})", "file": str(output),
            "metrics": {k: metrics.get(k) for k in ("clean_top1", "typographic_top1", "written_rate")}}


def setting_columns(rows: Sequence[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [k for k in row["settings"] if k not in columns]
    return columns


def flat_rows(rows: Sequence[dict]) -> list[dict]:
    """The table's rows: name, status, front mark, each setting, each metric, error and log."""
    columns = setting_columns(rows)
    out = []
    for row in rows:
        flat = {"name": row["name"], "status": row["status"],
                "pareto": "" if "pareto" not in row else ("yes" if row["pareto"] else "no")}
        flat.update({k: _setting(_value(row, k)) for k in columns})
        flat.update({k: row.get("metrics", {}).get(k) for k in METRICS})
        flat.update(error=row.get("error", ""), log=row.get("log") or "")
        out.append(flat)
    return out


def _value(row: dict, key: str):
    """A run's setting, or the base value it kept where only other runs vary it."""
    return row["settings"].get(key, row.get("flags", {}).get(key, ""))


def _setting(value) -> str:
    """A setting as the grid spells it (TOML booleans in lower case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def markdown(title: str, rows: Sequence[dict], reference: dict | None) -> str:
    columns = setting_columns(rows)
    done = [r for r in rows if "metrics" in r]
    lines = [f"# Sweep {title}", "",
             f"{len(rows)} runs: {len(done)} evaluated, {sum(r['status'] == 'failed' for r in rows)} failed, "
             f"{sum('metrics' not in r and r['status'] != 'failed' for r in rows)} missing. "
             "★ = on the Pareto front of clean vs attacked top-1 (both maximised; equal runs are all on it or all "
             "off it). Accuracies in %, KL = mean KL(π_θ‖π_ref) on clean images.", "",
             "| | run | " + " | ".join(columns) + " | clean | attacked | written | KL |",
             "|---|---|" + "---|" * len(columns) + "---:|---:|---:|---:|"]
    if reference is not None:
        m = reference["metrics"]
        lines.append(f"| | *{reference['name']}* |" + " |" * len(columns)
                     + f" {_pct(m['clean_top1'])} | {_pct(m['typographic_top1'])} | {_pct(m['written_rate'])} | 0 |")
    for row in done:
        m = row["metrics"]
        kl = "" if m.get("kl_to_ref") is None else f"{m['kl_to_ref']:.4g}"
        lines.append(f"| {'★' if row['pareto'] else ''} | {row['name']} | "
                     + " | ".join(_setting(_value(row, k)) for k in columns)
                     + f" | {_pct(m['clean_top1'])} | {_pct(m['typographic_top1'])} | {_pct(m['written_rate'])} | {kl} |")
    front = sorted((r for r in done if r["pareto"]), key=lambda r: -r["metrics"]["clean_top1"])
    lines += ["", "Pareto front, from the most clean-accurate to the most robust: "
              + (" → ".join(r["name"] for r in front) or "none")]
    problems = [r for r in rows if "metrics" not in r]
    if problems:
        lines += ["", "## Runs without results", "", "| run | status | why | log |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {r.get('error', '')} | {r.get('log') or ''} |" for r in problems]
    return "\n".join(lines) + "\n"


def plot_pareto(title: str, rows: Sequence[dict], reference: dict | None, path) -> Path:
    """All evaluated runs (clean vs attacked top-1), the front joined as a staircase, t-sweeps of head runs as thin
    lines, the reference and the CE baseline marked."""
    fig, ax = new_figure(PARETO_FIGSIZE)
    done = [r for r in rows if "metrics" in r]
    for row in done:
        if row.get("t_sweep") and "typographic_top1" in row["t_sweep"][0]:
            ax.plot([100 * p["clean_top1"] for p in row["t_sweep"]],
                    [100 * p["typographic_top1"] for p in row["t_sweep"]], "-", color="lightgray", linewidth=0.8,
                    zorder=1)
    groups = [("on the front", lambda r: r["pareto"] and not _is_ce(r), dict(marker="o", color="tab:red")),
              ("dominated", lambda r: not r["pareto"] and not _is_ce(r), dict(marker="o", color="tab:gray")),
              ("CE baseline, on the front", lambda r: r["pareto"] and _is_ce(r),
               dict(marker="X", color="tab:red", edgecolors="tab:purple", s=90)),
              ("CE baseline", lambda r: not r["pareto"] and _is_ce(r), dict(marker="X", color="tab:purple", s=70))]
    for label, keep, style in groups:
        chosen = [r for r in done if keep(r)]
        if chosen:
            ax.scatter([100 * r["metrics"]["clean_top1"] for r in chosen],
                       [100 * r["metrics"]["typographic_top1"] for r in chosen], label=label, zorder=3, **style)
    front = sorted((r for r in done if r["pareto"]), key=lambda r: r["metrics"]["clean_top1"])
    if front:
        xs = [100 * r["metrics"]["clean_top1"] for r in front]
        ys = [100 * r["metrics"]["typographic_top1"] for r in front]
        ax.step(xs, ys, where="post", color="tab:red", linewidth=1, alpha=0.6, zorder=2)
    labels: dict[tuple, list[str]] = {}  # runs at the same point share one label
    for row in done if len(done) <= LABEL_LIMIT else front:
        labels.setdefault((100 * row["metrics"]["clean_top1"], 100 * row["metrics"]["typographic_top1"]),
                          []).append(row["name"])
    for xy, names in labels.items():
        ax.annotate("\n".join(names), xy, textcoords="offset points", xytext=(4, 4), fontsize=7)
    if reference is not None:
        m = reference["metrics"]
        ax.scatter([100 * m["clean_top1"]], [100 * m["typographic_top1"]], marker="*", s=160, color="black",
                   label=reference["name"], zorder=4)
    if any(r.get("t_sweep") for r in done):
        ax.plot([], [], "-", color="lightgray", label="head runs over t (W_t)")
    ax.set_xlabel("clean top-1 (%)")
    ax.set_ylabel("top-1 on attacked images (%)")
    missing = len(rows) - len(done)
    ax.set_title(f"sweep {title}: {len(done)} runs" + (f" ({missing} without results, see the table)"
                                                       if missing else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def _is_ce(row: dict) -> bool:
    return row.get("flags", {}).get("po-loss", row["settings"].get("po-loss")) == "ce"


def add_parser(sub) -> None:
    """``python -m open_clip_po.eval pareto RUNS_DIR``: this report as a subcommand of the eval command line."""
    p = sub.add_parser("pareto", help="a sweep's runs in one table and the clean-vs-attacked Pareto front",
                       description="Collect the runs of python -m open_clip_po.sweep / scripts/slurm/sweep.sh: "
                                   "OUTPUT.csv and OUTPUT.md (every run's settings and metrics, the front marked, "
                                   "failed and missing runs listed), OUTPUT.png (scatter with the front, the "
                                   "reference and the CE baseline) and OUTPUT.json. See docs/sweeps.md.")
    p.add_argument("runs_dir", help="the sweep's runs folder (--out of python -m open_clip_po.sweep, LOGS of sweep.sh)")
    p.add_argument("--output", default=None, help="output path without suffix (default: RUNS_DIR/pareto)")
    p.add_argument("--no-reference", action="store_true",
                   help="do not evaluate the reference model (a result already in RUNS_DIR/reference/ is still used)")
    p.set_defaults(run=run_pareto)


def run_pareto(args) -> dict:
    """The ``pareto`` subcommand: OUT.csv, OUT.md, OUT.png and OUT.json (default RUNS_DIR/pareto.*)."""
    runs_dir = Path(args.runs_dir)
    grid, rows = collect(runs_dir)
    reference = reference_point(runs_dir, evaluate=not args.no_reference)
    title = grid.get("name", runs_dir.name)
    out = Path(args.output) if args.output else runs_dir / "pareto"
    write_csv(flat_rows(rows), out.with_suffix(".csv"))
    write_text(out.with_suffix(".md"), markdown(title, rows, reference))
    plot_pareto(title, rows, reference, out.with_suffix(".png"))
    result = {"sweep": title, "runs_dir": str(runs_dir), "reference": reference,
              "runs": [{k: v for k, v in r.items() if k != "t_sweep"} for r in rows]}
    write_json(result, out.with_suffix(".json"))
    front = [r["name"] for r in rows if r.get("pareto")]
    without = [r for r in rows if "metrics" not in r]
    print(f"{len(rows) - len(without)} runs evaluated, Pareto front: {', '.join(front) or 'none'} → "
          f"{out.with_suffix('.md')}, .csv, .png")
    for r in without:
        print(f"  {r['status']}: {r['name']} ({r.get('error', '')})" + (f", log {r['log']}" if r.get("log") else ""))
    return result
