"""Tables 1 and 2 in the paper's layout: markdown, CSV and a bar plot per table, from the rows' metrics.

Table 1: per data set top-1 on the original images (O) and, with ``--typographic``, on their typographic copies
(T), then the average over the data sets (Avg.); beneath it the written-class rate on T. Table 2: top-1 on each
real typographic set and the average, and the written-class rate. Numbers are percentages with two decimals
(the CSV keeps four).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...atomic import write_csv, write_text
from ..plots import WIDE_FIGSIZE, new_figure, save_figure
from .catalog import REAL, SYNTHETIC


@dataclass
class Table:
    title: str
    columns: list[str]                 # headers after "Method"
    keys: list[str]                    # CSV names of the columns
    rows: dict[str, list[float]]       # method → fractions (NaN where undefined)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| Method | " + " | ".join(self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]
        for label, values in self.rows.items():
            lines.append(f"| {label} | " + " | ".join(_pct(v) for v in values) + " |")
        return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _metric(row: dict, key: str, split: str, name: str) -> float:
    return row["datasets"][key]["metrics"].get(split, {}).get(name, math.nan)


def average(row: dict, keys: list[str], split: str, name: str = "acc1") -> float:
    return _mean(_metric(row, k, split, name) for k in keys)


def table1(rows: list[dict], sets: list, typographic: bool) -> list[Table]:
    keys, titles = [s.key for s in sets], [s.title for s in sets]
    splits = [("clean", "O")] + ([("typographic", "T")] if typographic else [])
    columns = [f"{t} {tag}" for t in titles for _, tag in splits] + [f"Avg. {tag}" for _, tag in splits]
    names = [f"{k}_{tag}" for k in keys for _, tag in splits] + [f"avg_{tag}" for _, tag in splits]
    accuracy = Table("Table 1: zero-shot top-1 (%), original (O) and typographic (T) images", columns, names, {
        row["label"]: [_metric(row, k, split, "acc1") for k in keys for split, _ in splits]
        + [average(row, keys, split) for split, _ in splits] for row in rows})
    if not typographic:
        return [accuracy]
    written = Table("Written-class rate on T (%): predictions that are the class written on the image",
                    titles + ["Avg."], [f"{k}_written" for k in keys] + ["avg_written"], {
                        row["label"]: [_metric(row, k, "typographic", "written_rate") for k in keys]
                        + [average(row, keys, "typographic", "written_rate")] for row in rows})
    return [accuracy, written]


def table2(rows: list[dict], sets: list) -> list[Table]:
    keys, titles = [s.key for s in sets], [s.title for s in sets]
    out = []
    for metric, title, suffix in (("acc1", "Table 2: zero-shot top-1 (%) on real typographic images", "acc1"),
                                  ("written_rate", "Written-class rate (%) on real typographic images", "written")):
        out.append(Table(title, titles + ["Avg."], [f"{k}_{suffix}" for k in keys] + [f"avg_{suffix}"], {
            row["label"]: [_metric(row, k, "typographic", metric) for k in keys]
            + [average(row, keys, "typographic", metric)] for row in rows}))
    return out


def write_tables(tables: list[Table], stem: Path, note: str = "") -> list[Path]:
    """``stem.md`` (every table) and ``stem.csv`` (one row per method, every table's columns)."""
    markdown = "\n".join(t.markdown() for t in tables) + (f"\n{note}\n" if note else "")
    write_text(stem.with_suffix(".md"), markdown)
    columns = ["method"] + [k for t in tables for k in t.keys]
    csv_rows = []
    for label in tables[0].rows:
        record = {"method": label}
        for t in tables:
            record.update({k: ("" if math.isnan(v) else round(100 * v, 4)) for k, v in zip(t.keys, t.rows[label])})
        csv_rows.append(record)
    write_csv(csv_rows, stem.with_suffix(".csv"), columns)
    return [stem.with_suffix(".md"), stem.with_suffix(".csv")]


def plot_bars(table: Table, groups: list[str], bars: list[str], path: Path, title: str) -> Path:
    """Grouped bars: per group (data set) one bar per method and ``bars`` entry (e.g. O and T), T hatched."""
    fig, ax = new_figure(WIDE_FIGSIZE)
    methods = list(table.rows)
    width = 0.8 / max(1, len(methods) * len(bars))
    x = np.arange(len(groups))
    colors = [f"C{i % 10}" for i in range(len(methods))]
    for m, method in enumerate(methods):
        values = table.rows[method]
        for b, bar in enumerate(bars):
            heights = [100 * values[g * len(bars) + b] for g in range(len(groups))]
            offset = (m * len(bars) + b - (len(methods) * len(bars) - 1) / 2) * width
            ax.bar(x + offset, [0 if math.isnan(h) else h for h in heights], width, color=colors[m],
                   hatch="//" if b else None, edgecolor="white" if b else None,
                   label=f"{method} {bar}".strip())
    ax.set_xticks(x, groups, rotation=20, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=max(1, len(methods)), loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)


def kinds(sets: list) -> tuple[list, list]:
    return [s for s in sets if s.kind == SYNTHETIC], [s for s in sets if s.kind == REAL]
