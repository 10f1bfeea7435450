"""benchmarks/gpu.py, the one command for a lent GPU, run as CI runs it (``--device cpu --quick``): the same code on
po-tiny — every step of both families measured, the reference-cache build, the triplet reader, the 20-step torchrun
run — and the JSON, plot and BENCHMARKS section it writes. (No speed is asserted: the figures are measurements.)"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _steps import FAMILIES  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    markdown = out / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nMeasured before.\n\n## data\n\n| kept |\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--json", str(out / "gpu.json"), "--markdown", str(markdown)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), markdown.read_text(), out


@pytest.mark.slow
@pytest.mark.integration
def test_every_step_is_measured_with_time_flops_and_memory(quick_run):
    report, _, _ = quick_run
    assert report["device"].startswith("CPU") and report["precision"] == "amp_bf16" and report["quick"]
    assert [(m["model"], m["batch_size"]) for m in report["models"]] == [("po-tiny", 8), ("po-tiny", 4)]
    for model in report["models"]:
        for family, names in FAMILIES.items():
            steps = model["families"][family]
            assert set(steps) == set(names)
            for name, s in steps.items():
                assert s["ms"] > 0 and s["flops"] > 0 and s["resident_mb"] > 0, (family, name)
                assert s["samples_per_s"] == pytest.approx(model["batch_size"] / s["ms"] * 1e3)
                assert s["peak_mb"] >= s["resident_mb"]
            # 2–5-word captions in po-tiny's 16 positions: the span is 8, open_clip's stock step runs all 16
            assert steps["clip_stock"]["text_positions"] == 16
            assert {s["text_positions"] for n, s in steps.items() if n != "clip_stock"} == {8}
            assert steps["clip_span"]["flops"] < steps["clip_stock"]["flops"]
            assert steps["po_cache"]["flops"] < steps["po_online"]["flops"]  # no reference forward
            # the online reference's weights are resident beside the policy's; the cache keeps none on the device
            assert steps["po_online"]["resident_mb"] > steps["po_cache"]["resident_mb"]
        ratios = {(r["family"], r["step"]): r for r in model["ratios"]}
        head = ratios[("full", "po_head")]
        assert head["baseline"] == "frozen_forward" and head["flops_vs_baseline"] == pytest.approx(1.0, abs=0.01)
        online = ratios[("full", "po_online")]
        assert online["flops_vs_baseline"] > online["flops_vs_stock"]  # the like-for-like baseline is the cheaper


@pytest.mark.slow
@pytest.mark.integration
def test_the_training_run_cache_build_and_reader(quick_run):
    report, _, _ = quick_run
    run = report["training_run"]
    assert run["returncode"] == 0 and run["steps_logged"] == 20 and run["finite"]
    assert len(run["losses"]) == len(run["reg_kls"]) == 20 and run["backend"] == "gloo"
    assert all(math.isfinite(v) for v in run["losses"] + run["reg_kls"]) and min(run["reg_kls"]) >= 0
    assert run["losses"][0] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its reference
    assert not run["process_group"] and run["processes"] == 1
    cache = report["cache_build"]
    assert cache["shard_files"] == 8 and cache["samples"] == 64 and cache["samples_per_s"] > 0
    reader = report["reader"]
    assert [e["samples"] for e in reader["epochs"]] == [32] * 4 and reader["samples_per_s"] > 0


@pytest.mark.slow
@pytest.mark.integration
def test_it_writes_its_section_beside_the_others_and_a_plot(quick_run):
    _, markdown, out = quick_run
    assert "## data\n\n| kept |" in markdown  # another section, untouched
    section = markdown[markdown.index("## gpu (cpu, quick)"):]
    assert "### po-tiny, batch 8" in section and "### po-tiny, batch 4" in section
    assert section.count("| full fine-tune: PO, online reference |") == 2
    assert "20-step `torchrun --nproc_per_node 1 -m open_clip_po.main`, amp_bf16, gloo | finite |" in section
    assert (out / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
