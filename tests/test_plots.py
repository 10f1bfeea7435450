"""Plots say what they show: titled by the run, one name per metric, legends off the data, example grids labelled."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from open_clip_po.demo import gender_report
from open_clip_po.demo.grid import LABEL_PX, labelled_grid
from open_clip_po.eval import gender as eval_gender
from open_clip_po.eval import tsweep, zeroshot
from open_clip_po.eval.plots import run_label


def test_run_label_is_the_runs_name():
    assert run_label("/x/logs/dpo-head/checkpoints/epoch_3.pt") == "dpo-head epoch_3"
    assert run_label("runs/scaled/dpo-image-head.t1.pt") == "dpo-image-head.t1"
    assert run_label("openai") == "openai"


def _captured(monkeypatch, module, name="save_figure", figures=None):
    """The figures ``module`` saves (into ``figures``, a new list by default), instead of saving them."""
    figures = [] if figures is None else figures
    monkeypatch.setattr(module, name, lambda fig, path: figures.append(fig) or path)
    return figures


def _legends_off_the_data(fig) -> int:
    """How many legends the figure has; asserts that none overlaps an axes that plots data."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    data_axes = [ax for ax in fig.axes if ax.has_data()]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in data_axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend, ax)
    return len(legends)


def _texts(fig) -> str:
    parts = []
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        parts += [t.get_text() for t in ax.get_xticklabels()]
        if ax.get_legend() is not None:
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
    return " | ".join(parts)


def test_zeroshot_and_tsweep_plots_name_metrics_one_way_with_legends_outside(monkeypatch, tmp_path):
    figures = _captured(monkeypatch, zeroshot)
    zeroshot.plot_zeroshot({"clean_top1": 0.9, "typographic_top1": 0.5, "written_rate": 0.4}, 8, "test — dpo epoch_3",
                           tmp_path / "z.png")
    rows = [{"t": t, "clean_top1": 0.8, "typographic_top1": 0.3 + 0.1 * t, "written_rate": 0.5 - 0.1 * t}
            for t in (-1.0, 0.0, 1.0, 2.0)]
    _captured(monkeypatch, tsweep, figures=figures)
    tsweep.plot_sweep(rows, "test — dpo-head epoch_3", tmp_path / "t.png")
    for fig in figures:
        assert _legends_off_the_data(fig) == 1
    bars, sweep = _texts(figures[0]), _texts(figures[1])
    assert "test — dpo epoch_3" in bars and "test — dpo-head epoch_3" in sweep
    for name in ("clean top-1", "attacked top-1", "written-class rate"):
        assert name in bars and name in sweep
    for other in ("OCR", "label rate", "object accuracy", "on attacked images"):
        assert other not in sweep


def test_gender_plots_keep_legends_off_the_bars_and_the_crossing(monkeypatch, tmp_path):
    ts = [-1.0, 0.0, 0.5, 1.0]
    curves = {"t": ts, "p_true_gender": [0.9, 0.8, 0.5, 0.2], "p_flipped_gender": [0.1, 0.2, 0.5, 0.8],
              "activity_accuracy": [0.9] * 4, "t_star": 0.5, "p_man": torch.rand(4, 6)}
    figures = _captured(monkeypatch, eval_gender)
    eval_gender.plot_gender(curves, torch.tensor([True, False] * 3), "people.csv — dpo-image-head epoch_5",
                            tmp_path / "g.png")
    keys = ("t=0 (base)", "t=1 (trained)", "t*=0.500 (neutral)")
    retrieval = {key: [{"prompt": f"The person is {a}", "k": 10, "men": 5, "women": 5, "women_fraction": 0.5}
                       for a in ("cooking", "fishing")] for key in keys}
    eval_gender.plot_retrieval(retrieval, tmp_path / "r.png")
    assert [_legends_off_the_data(fig) for fig in figures] == [2, 1]
    assert "dpo-image-head epoch_5" in _texts(figures[0])

    demo = _captured(monkeypatch, gender_report, "_save")
    rows = [{"method": m, "curves": curves, "t_star": t_star, "retrieval": retrieval,
             "retrieval_lean": {"t": ts, "prompts": ["The person is cooking"], "lean": [[1.0, 0.5, 0.0, -0.5]]}}
            for m, t_star in (("DPO + image head", 0.5), ("KTO + image head", math.nan))]
    gender_report.plot_flip(rows, tmp_path / "f.png")
    gender_report.plot_retrieval_mix(rows, tmp_path / "m.png")
    gender_report.plot_leans(rows, tmp_path / "l.png")
    assert [_legends_off_the_data(fig) for fig in demo] == [1, 1, 1]
    titles = _texts(demo[1])
    assert "DPO + image head (t* = 0.500)" in titles and "KTO + image head (t* = —)" in titles


def test_example_grid_names_its_rows_and_columns():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    grid = labelled_grid([("object", [red, blue]), ("attacked test", [blue])], side=32, columns=["a", "b"])
    pixels = np.asarray(grid)
    margin = grid.width - 2 * 32
    header = 2 * LABEL_PX
    assert grid.height == header + 2 * 32 and margin > 0
    for row in range(2):   # each row's label: dark text in the margin, level with the row
        band = pixels[header + row * 32: header + (row + 1) * 32, :margin]
        assert (band.sum(axis=-1) < 200).any()
    assert (pixels[:header, margin:].sum(axis=-1) < 200).any()   # the column names
    assert tuple(pixels[header + 5, margin + 5]) == (255, 0, 0)   # images right of the labels, scaled
    assert tuple(pixels[header + 32 + 5, margin + 5]) == (0, 0, 255)
    assert tuple(pixels[header + 32 + 5, margin + 32 + 5]) == (255, 255, 255)   # a short row stays blank


@pytest.mark.parametrize("label", ["object", "labelled", "word", "sign", "attacked test"])
def test_every_row_label_fits_the_margin(label):
    grid = labelled_grid([(label, [Image.new("RGB", (8, 8), "white")])], side=16)
    pixels = np.asarray(grid)
    assert (pixels[:, :grid.width - 16].sum(axis=-1) < 200).any()
