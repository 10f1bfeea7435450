"""What a demo shows its user while it runs and when it ends: progress read from a stage's log at a steady
cadence, the log paths, one line on Ctrl-C, and a ``--quick`` report that keeps its own targets apart from the full
demo's claim."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from open_clip_po.demo import summary_line
from open_clip_po.demo.pipeline import Runner, StageError
from open_clip_po.demo.progress import StageProgress, flag_value
from open_clip_po.demo.typographic_report import check_quick_targets, write_report

# A stand-in for a training stage: silent while it "starts up", then open_clip's step lines, 3 per epoch.
FAKE_TRAINING = """
import sys, time
time.sleep(float(sys.argv[1]))
for epoch in range(2):
    for n in (32, 64, 96):
        print(f"2026-01-01,00:00:00 | INFO | Train Epoch: {epoch} [{n:>3}/96 ({100 * n // 96}%)] Data (t): 0.1 "
              "Batch (t): 0.4, 80/s LR: 0.001 loss: 0.69", file=sys.stderr, flush=True)
        time.sleep(float(sys.argv[2]))
"""
PROGRESS = re.compile(r"epoch (?P<epoch>\d)/2, (?P<done>\d+)/96 samples, (?P<pct>\d+)% of the stage, "
                      r"[\d.]+ samples/s, ETA \d+s")


def test_stage_progress_counts_samples_over_epochs_with_rate_and_eta():
    p = StageProgress("finetune-dpo", epochs=3, start=0.0)
    assert p.line(10.0) == "[finetune-dpo] 10s: starting, no training step logged yet"
    p.feed("... | Train Epoch: 0 [ 100/1000 (10%)] Data (t): ...", now=20.0)
    p.feed("... | Train Epoch: 1 [ 500/1000 (50%)] Data (t): ...", now=120.0)
    # 1400 samples in 100 s since the first step line: 14/s; 3000 - 1500 left: 107 s
    assert p.line(120.0) == ("[finetune-dpo] epoch 2/3, 500/1000 samples, 50% of the stage, 14.0 samples/s, "
                             "ETA 1m47s (2m00s)")
    other = StageProgress("shards", epochs=None, start=0.0)
    other.feed("building: 40%|████      | 4/10", now=5.0)
    assert other.line(65.0) == "[shards] 1m05s: building: 40%|████      | 4/10"
    assert flag_value(["--epochs", "3", "--logs=/x", "--epochs", "4"], "--epochs") == "4"
    assert flag_value(["--logs=/x"], "--logs", "--logs-dir") == "/x"


@pytest.mark.slow
def test_runner_prints_log_paths_and_progress_at_least_every_interval(tmp_path, caplog):
    every = 1.0
    runner = Runner(tmp_path, progress_every=every)
    argv = [sys.executable, "-c", FAKE_TRAINING, "2.5", "0.4", "--epochs", "2", "--logs", str(tmp_path / "runs"),
            "--name", "fake"]
    with caplog.at_level(logging.INFO, logger="open_clip_po.demo"):
        start = time.time()
        runner.run("pretrain-fake", argv)
        end = time.time()
    records = [r for r in caplog.records if r.name == "open_clip_po.demo"]
    lines = [r.getMessage() for r in records]
    assert f"[pretrain-fake] output: {tmp_path / 'logs' / 'pretrain-fake.log'} (open_clip's log: " \
           f"{tmp_path / 'runs' / 'fake' / 'out.log'})" in lines
    # start-up is not silence: the stage says it is starting before its first step is logged
    assert any("starting, no training step logged yet" in line for line in lines)
    steps = [PROGRESS.search(line) for line in lines if PROGRESS.search(line)]
    assert steps, lines
    for m in steps:  # the share of the stage is the epochs done plus this epoch's samples, over 2 epochs of 96
        done = (int(m["epoch"]) - 1) * 96 + int(m["done"])
        assert int(m["pct"]) == round(100 * done / 192)
    assert lines[-1].startswith("[pretrain-fake] done in ")
    # a line at least every `every` seconds (plus the polling interval and a margin for a loaded machine)
    times = [start] + [r.created for r in records] + [end]
    assert max(b - a for a, b in zip(times, times[1:])) <= every + 2.5
    assert "Train Epoch: 1 [ 96/96" in (tmp_path / "logs" / "pretrain-fake.log").read_text()


def test_a_failed_stage_names_its_log_and_last_line(tmp_path):
    runner = Runner(tmp_path)
    with pytest.raises(StageError, match=r"stage 'broken' failed \(exit 3\); see .*broken\.log: no such data"):
        runner.run("broken", [sys.executable, "-c", "import sys; print('no such data'); sys.exit(3)"])


@pytest.mark.slow
@pytest.mark.integration
def test_ctrl_c_stops_the_stage_with_one_line(tmp_path):
    """The real demo command, interrupted while its shard builder runs, as a terminal's Ctrl-C does it: SIGINT to the
    whole foreground process group. One line, exit 130, and nothing of the group left running."""
    import open_clip
    import torch

    from open_clip_po.checkpoint import atomic_save

    torch.manual_seed(0)
    atomic_save({"state_dict": open_clip.create_model("po-small").state_dict()}, tmp_path / "start.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "open_clip_po.demo", "--quick", "--quiet", "--out",
                             str(tmp_path / "demo"), "--pretrained", str(tmp_path / "start.pt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "[shards] output:" in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any("[shards] output:" in line for line in seen), "".join(seen)
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest and rest.strip().count("\n") == 0, rest
    assert rest.startswith("open_clip_po.demo: interrupted during stage 'shards' (its output: ")
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the builder (same process group) is gone too
        os.killpg(proc.pid, 0)


def _rows(pre_written=0.30, dpo_written=0.10):
    return [{"method": "pre-trained", "loss": None, "head": False, "clean": 0.50, "attacked": 0.30,
             "written_rate": pre_written, "kl_to_ref": 0.0},
            {"method": "DPO", "loss": "dpo", "head": False, "clean": 0.50, "attacked": 0.36,
             "written_rate": dpo_written, "kl_to_ref": 0.2},
            {"method": "CE", "loss": "ce", "head": False, "clean": 0.50, "attacked": 0.40, "written_rate": 0.05,
             "kl_to_ref": 0.1}]


def test_quick_report_keeps_its_own_targets_apart_from_the_claim(tmp_path):
    cfg = {"model": "po-small", "num_classes": 8, "quick": True}
    report = write_report(tmp_path, cfg=cfg, counts={}, rows=_rows(), sweep=None, timings={"total": 1.0})
    # +6 attacked is far from the claim's +30, and DPO is farther from the reference than CE: the claim is not met,
    # but every target of the pipeline check is
    assert not report["targets"]["robust_met"] and not report["targets"]["closer_met"]
    assert report["quick_targets"] == {"every_run_finished": True, "attack_costs_pretrained": True,
                                       "po_raises_attacked": True, "po_reads_less": True, "met": True}
    assert json.loads((tmp_path / "report.json").read_text())["quick_targets"]["met"] is True
    md = (tmp_path / "report.md").read_text()
    note, own, claim = (md.index("A pipeline check (`--quick`)"), md.index("Targets of this pipeline check"),
                        md.index("The full demo's claim, measured here but not expected of `--quick`"))
    assert note < md.index("| method |") < own < claim
    own_section = md[own:claim]
    assert own_section.count("**met**") == 4 and "not met" not in own_section
    assert "**not met**" in md[claim:]
    assert summary_line(report).startswith("pipeline check: met; the full demo's claim, not expected of --quick: "
                                           "robustness not met")


def test_quick_targets_fail_when_po_does_not_move_the_model(tmp_path):
    rows = _rows(dpo_written=0.35)
    rows[1]["attacked"] = 0.29
    rows.append({"method": "DPO + head", "loss": "dpo", "head": True, "error": "stage failed"})
    t = check_quick_targets(rows)
    assert t == {"every_run_finished": False, "attack_costs_pretrained": True, "po_raises_attacked": False,
                 "po_reads_less": False, "met": False}
    assert check_quick_targets(rows[:1])["po_raises_attacked"] is None  # --pretrain-only: nothing to judge


def test_full_report_has_no_pipeline_check(tmp_path):
    report = write_report(tmp_path, cfg={"model": "po-small", "num_classes": 24, "quick": False}, counts={},
                          rows=_rows(), sweep=None, timings={})
    md = (tmp_path / "report.md").read_text()
    assert "quick_targets" not in report and "pipeline check" not in md and "\nTargets: attacked accuracy" in md
    assert summary_line(report) == "targets: robustness not met, closer to reference than CE not met"


def _gender_row(p_true):
    ts = [-1.0, 0.0, 0.5, 1.0]
    return {"method": "DPO + image head", "t_star": float("nan"),
            "curves": {"t": ts, "p_true_gender": p_true, "p_flipped_gender": [1 - p for p in p_true],
                       "p_true_gender_se": [0.01] * 4, "flipped_choice": [1 - p for p in p_true],
                       "activity_accuracy": [0.9] * 4},
            "retrieval": {"t=0 (base)": [{"prompt": "The person is cooking", "k": 10, "women": 7,
                                          "women_fraction": 0.7}]}}


def test_gender_quick_report_checks_the_flips_direction_apart_from_the_claim(tmp_path):
    from open_clip_po.demo.gender_report import check_gender_quick_targets, write_gender_report

    row = _gender_row([0.95, 0.7, 0.6, 0.55])   # the right direction, far from a flip
    assert check_gender_quick_targets(row) == {"lower_at_t1": True, "higher_below_0": True, "met": True}
    assert not check_gender_quick_targets(_gender_row([0.6, 0.7, 0.8, 0.9]))["met"]
    report = write_gender_report(tmp_path, cfg={"model": "po-small", "pretrain_images": 3000, "quick": True},
                                 counts={"test": 300}, rows=[row], scaled={}, pretrained="p.pt", timings={})
    assert report["quick_targets"]["DPO + image head"]["met"]
    assert not report["targets"]["DPO + image head"]["flips"]
    md = (tmp_path / "report.md").read_text()
    own, claim = md.index("Targets of this pipeline check"), md.index("The full demo's claim, measured here but not")
    assert md.index("A pipeline check (`--quick`)") < own < claim
    assert "**not met**" not in md[own:claim] and "**not met**" in md[claim:]
