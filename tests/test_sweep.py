"""Hyper-parameter sweeps (open_clip_po.sweep, scripts/slurm/sweep.sh) and their Pareto report
(python -m open_clip_po.eval pareto): the grid's expansion, run folders and records, a 2×2 grid of po-tiny runs
through the local launcher and through one job array on a SLURM brought up on loopback."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from open_clip_po.sweep.pareto import pareto_front
from open_clip_po.sweep import GridError, grid_from_dict, run_status
from open_clip_po.sweep.driver import po_launch_shell
from open_clip_po.sweep.runs import ATTEMPTS, prepare_run, record_done
from open_clip_po.sweep.spec import load_grid
from slurm_cluster import start_or_skip, without_script_settings

REPO = Path(__file__).resolve().parents[1]
SWEEP_SH = REPO / "scripts" / "slurm" / "sweep.sh"
EVAL = {"images": "test", "attack-on-the-fly": True}


# -- the front -----------------------------------------------------------------------------------------------------

def test_pareto_front_of_hand_made_points_with_ties_and_duplicates():
    points = [(0.9, 0.2),   # best clean: front
              (0.8, 0.5),   # front
              (0.8, 0.5),   # its exact duplicate: neither dominates the other, both on the front
              (0.8, 0.4),   # same clean as the two above, worse attacked: dominated
              (0.5, 0.5),   # same attacked as (0.8, 0.5), worse clean: dominated
              (0.6, 0.3),   # dominated by (0.8, 0.5)
              (0.6, 0.3),   # a dominated duplicate: dominated too
              (0.3, 0.7),   # best attacked: front
              (0.9, 0.2)]   # duplicate of the best clean: front
    assert pareto_front(points) == [True, True, True, False, False, False, False, True, True]
    assert pareto_front([]) == [] and pareto_front([(0.1, 0.1)]) == [True]


# -- the grid ------------------------------------------------------------------------------------------------------

def test_grid_expands_to_the_cartesian_product_then_the_points_with_stable_names():
    grid = grid_from_dict({"base": {"model": "po-tiny", "--epochs": 1},
                           "axes": {"po-loss": ["dpo", "ipo"], "lr": [1e-3, "3e-4"], "po-linear-head": [False, True]},
                           "points": [{"po-loss": "ce", "po-reg-lambda": 0}], "eval": EVAL}, "g.toml")
    runs = grid.runs()
    assert [r.name for r in runs] == [
        "dpo_lr0.001_full", "dpo_lr0.001_head", "dpo_lr3e-4_full", "dpo_lr3e-4_head",
        "ipo_lr0.001_full", "ipo_lr0.001_head", "ipo_lr3e-4_full", "ipo_lr3e-4_head", "ce_lambda0"]
    assert [r.index for r in runs] == list(range(9))
    assert runs[3].flags == {"model": "po-tiny", "epochs": 1, "po-loss": "dpo", "lr": "3e-4", "po-linear-head": True}
    assert runs[3].settings == {"po-loss": "dpo", "lr": "3e-4", "po-linear-head": True}
    assert runs[8].flags == {"model": "po-tiny", "epochs": 1, "po-loss": "ce", "po-reg-lambda": 0}
    again = grid_from_dict({"base": grid.base, "axes": grid.axes, "points": grid.points, "eval": grid.eval}, "g")
    assert again.runs() == runs  # the same grid always expands to the same runs and names


@pytest.mark.parametrize("raw, message", [
    ({"base": {"name": "x"}, "axes": {"lr": [1]}}, "--name is set by the sweep"),
    ({"base": {"lr": 1}, "axes": {"lr": [1, 2]}}, "--lr is in both [base] and [axes]"),
    ({"axes": {"lr": 1}}, "[axes].lr: give a non-empty list of values"),
    ({"axes": {"lr": [1]}, "points": [{"lr": 1}]}, "both named 'lr1'"),
    ({"base": {"lr": 1}}, "no runs: give [axes] or [[points]]"),
    ({"axes": {"lr": [1]}, "eval": {"images": "t"}}, "exactly one of typographic = ... and attack-on-the-fly"),
    ({"axes": {"lr": [1]}, "eval": {}}, "images = ... (the clean evaluation set) is required"),
    ({"axes": {"lr": [1]}, "sweeps": {}}, "unknown key(s) sweeps"),
    ({"axes": {"lr": [{"a": 1}]}}, "is not a flag value"),
])
def test_bad_grids_are_refused_with_the_reason(raw, message):
    with pytest.raises(GridError) as e:
        grid_from_dict({"eval": EVAL, **raw}, "g.toml")
    assert message in str(e.value)


def test_po_launch_variables_for_an_array_element(tmp_path):
    grid = grid_from_dict({"base": {"model": "po-tiny", "train-data": "s/pref-{0..1}.tar", "po-template": "a {} x",
                                    "po-candidates": "classes", "train-num-samples": 16},
                           "axes": {"po-loss": ["ce"], "lr": ["1e-3"], "po-linear-head": [True]}, "eval": EVAL}, "g")
    shell = po_launch_shell(grid.runs()[0], tmp_path)
    script = shell + 'printf "%s|" "$NAME" "$LOGS" "$PO_LOSS" "$LR" "$MODEL" "$TRAIN_DATA" "[$PRETRAINED]" "[$REG_DATA]"' \
                     ' "${PO_BETA-unset}" "$TRAIN_NUM_SAMPLES"; echo; printf "%s\\n" "${run_args[@]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == f"ce_lr1e-3_head|{tmp_path}|ce|1e-3|po-tiny|s/pref-{{0..1}}.tar|[]|[]|unset|16|"
    # The flags po_launch has no variable for come after its own, as arguments; so does the sample count, which
    # po_launch reads for its warm-up only.
    assert out[1:] == ["--po-template", "a {} x", "--po-candidates", "classes", "--train-num-samples", "16",
                       "--po-linear-head"]


def test_a_broken_run_is_moved_aside_and_a_done_run_is_never_redone(tmp_path):
    run = grid_from_dict({"axes": {"lr": [1]}, "eval": EVAL}, "g").runs()[0]
    assert run_status(tmp_path, run.name) == "pending"
    folder = prepare_run(tmp_path, run, ["train"])
    (folder / "out.log").write_text("half a run")
    assert run_status(tmp_path, run.name) == "broken"
    folder = prepare_run(tmp_path, run, ["train"])
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]
    assert (tmp_path / ATTEMPTS / f"{run.name}.1" / "out.log").read_text() == "half a run"
    record_done(folder, {"metrics": {}})
    assert run_status(tmp_path, run.name) == "done"
    with pytest.raises(RuntimeError, match="already done"):
        prepare_run(tmp_path, run, ["train"])


def test_report_lists_failed_and_missing_runs_and_marks_the_front(tmp_path):
    from open_clip_po.eval.__main__ import main as eval_main
    from open_clip_po.sweep.runs import record_failure, write_plan

    grid = grid_from_dict({"axes": {"po-loss": ["dpo", "ce"], "lr": ["1e-3", "1e-2"]}, "eval": EVAL}, "g")
    runs = grid.runs()
    write_plan(grid, runs, tmp_path)
    for run, (clean, attacked) in zip(runs[:2], [(0.5, 0.25), (0.5, 0.5)]):
        folder = prepare_run(tmp_path, run, ["train"])
        record_done(folder, {"settings": run.settings, "flags": run.flags,
                             "metrics": {"clean_top1": clean, "typographic_top1": attacked, "written_rate": 0.1,
                                         "kl_to_ref": 0.2}})
    record_failure(prepare_run(tmp_path, runs[2], ["train"]), "train", "training exited with status 1: boom",
                   "/logs/x.out", 1)
    assert eval_main(["pareto", str(tmp_path), "--no-reference"]) == 0
    report = {r["name"]: r for r in json.loads((tmp_path / "pareto.json").read_text())["runs"]}
    assert {n: (r["status"], r.get("pareto")) for n, r in report.items()} == {
        "dpo_lr1e-3": ("done", False), "dpo_lr1e-2": ("done", True), "ce_lr1e-3": ("failed", None),
        "ce_lr1e-2": ("pending", None)}
    md = (tmp_path / "pareto.md").read_text()
    assert "4 runs: 2 evaluated, 1 failed, 1 missing." in md
    assert "| ce_lr1e-3 | failed | train: training exited with status 1: boom | /logs/x.out |" in md
    assert "| ce_lr1e-2 | pending | not started |  |" in md
    assert (tmp_path / "pareto.csv").read_text().splitlines()[3].startswith("ce_lr1e-3,failed,,ce,1e-3,,,,,train:")


# -- end to end on po-tiny -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy triplet shards (16 samples), a saved po-tiny to start from, 8 colour classes × 2 test images."""
    import open_clip
    import torch

    from open_clip_po.checkpoint import atomic_save
    from po_toy import COLOURS, colour_image, write_toy_shards

    root = tmp_path_factory.mktemp("sweep-world")
    patterns = write_toy_shards(root / "shards", num_samples=16, per_shard=8)
    torch.manual_seed(0)
    atomic_save({"state_dict": open_clip.create_model("po-tiny").state_dict()}, root / "pretrained.pt")
    rng = random.Random(1)
    for colour in COLOURS:
        (root / "test" / colour).mkdir(parents=True)
        for i in range(2):
            (root / "test" / colour / f"{i}.png").write_bytes(colour_image(colour, rng))
    return {**patterns, "root": root}


def write_grid(world, path: Path, extra: str = "") -> Path:
    """The 2×2 grid of the tests: lr × (full model, linear head), one epoch of 16 samples each."""
    path.write_text(f"""
name = "tiny"
[base]
po-loss = "dpo"
model = "po-tiny"
pretrained = "{world['root'] / 'pretrained.pt'}"
train-data = "{world['pref']}"
po-reg-data = "{world['reg']}"
train-num-samples = 16
po-reg-num-samples = 16
batch-size = 8
epochs = 1
warmup = 1
precision = "fp32"
workers = 1
wd = 0
seed = 0
[axes]
lr = ["1e-3", "3e-2"]
po-linear-head = [false, true]
{extra}
[eval]
images = "{world['root'] / 'test'}"
attack-on-the-fly = true
template = "a photo of a {{}}."
t = "0:1:0.5"
batch-size = 16
""")
    return path


NAMES = ["lr1e-3_full", "lr1e-3_head", "lr3e-2_full", "lr3e-2_head"]


def run_module(*argv, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env, timeout=timeout)


def check_runs_and_report(runs: Path) -> dict:
    """Every run has its eval.json; the report lists all four and marks the front as computed here by hand."""
    records = {name: json.loads((runs / name / "eval.json").read_text()) for name in NAMES}
    for name, record in records.items():
        assert record["name"] == name and record["checkpoint"] == "checkpoints/epoch_1.pt"
        assert (runs / name / record["checkpoint"]).is_file() and (runs / name / "eval" / "zeroshot.json").is_file()
        m = record["metrics"]
        assert 0 <= m["clean_top1"] <= 1 and 0 <= m["typographic_top1"] <= 1 and m["kl_to_ref"] >= 0
        assert (record["t_sweep"] is not None) == name.endswith("head")  # head runs get the t-sweep
    # t = 0 of a head's t-sweep is the start model, t = 1 the trained head (as evaluated by zeroshot).
    head = records["lr3e-2_head"]
    assert [row["t"] for row in head["t_sweep"]] == [0.0, 0.5, 1.0]
    assert head["t_sweep"][-1]["clean_top1"] == pytest.approx(head["metrics"]["clean_top1"])

    proc = run_module("open_clip_po.eval", "pareto", str(runs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = {n: (r["metrics"]["clean_top1"], r["metrics"]["typographic_top1"]) for n, r in records.items()}
    by_hand = {n: not any(o[0] >= p[0] and o[1] >= p[1] and o != p for o in points.values())
               for n, p in points.items()}
    report = json.loads((runs / "pareto.json").read_text())
    assert {r["name"]: r["pareto"] for r in report["runs"]} == by_hand
    assert report["reference"]["metrics"]["clean_top1"] is not None  # the start model, evaluated once
    csv_rows = (runs / "pareto.csv").read_text().splitlines()
    assert csv_rows[0].startswith("name,status,pareto,lr,po-linear-head,clean_top1") and len(csv_rows) == 5
    md = (runs / "pareto.md").read_text()
    for name in NAMES:
        assert f"| {'★' if by_hand[name] else ''} | {name} |" in md
    assert (runs / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return records


@pytest.mark.integration
@pytest.mark.slow
def test_local_launcher_runs_the_grid_skips_done_runs_and_records_a_failure(world, tmp_path):
    grid, runs = write_grid(world, tmp_path / "grid.toml"), tmp_path / "runs"
    proc = run_module("open_clip_po.sweep", str(grid), "--out", str(runs), "--parallel", "2", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "4 ran, 0 already done, 0 failed" in proc.stdout
    records = check_runs_and_report(runs)

    # Again, with one more run that cannot train: the four are left alone, the new one is recorded as failed.
    bad = write_grid(world, tmp_path / "bad.toml", extra='[[points]]\nlr = "1e-3"\npo-beta = -1\n')
    proc = run_module("open_clip_po.sweep", str(bad), "--out", str(runs), "--quiet")
    assert proc.returncode == 1
    assert "0 ran, 4 already done, 1 failed" in proc.stdout
    assert {n: json.loads((runs / n / "eval.json").read_text())["finished"] for n in NAMES} == \
        {n: r["finished"] for n, r in records.items()}
    failure = json.loads((runs / "lr1e-3_beta-1" / "failed.json").read_text())
    assert failure["stage"] == "train" and "--po-beta must be > 0" in failure["error"]
    proc = run_module("open_clip_po.eval", "pareto", str(runs))
    assert "failed: lr1e-3_beta-1 (train: training exited with status 1" in proc.stdout
    assert "| lr1e-3_beta-1 | failed | train: training exited with status 1" in (runs / "pareto.md").read_text()


# -- one SLURM job array ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    cluster = start_or_skip(cpus=2)
    yield cluster
    cluster.stop()


def array_elements(slurm, job: str) -> dict[str, dict]:
    out = slurm.run(["scontrol", "show", "job", "-o", job]).stdout
    elements = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line]
    return {e["ArrayTaskId"]: e for e in elements}


def wait_for_array(slurm, job: str, timeout: float) -> dict[str, dict]:
    """The last state seen of each element (slurmctld forgets finished jobs after MinJobAge, so keep them)."""
    deadline, seen = time.monotonic() + timeout, {}
    while True:
        elements = array_elements(slurm, job)
        seen.update(elements)
        active = {e["JobState"] for e in elements.values()} & {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}
        if not active:
            return seen
        if time.monotonic() > deadline:
            slurm.run(["scancel", job], check=False)
            raise TimeoutError(f"array {job} not finished after {timeout:.0f} s: {active}")
        time.sleep(2)


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.slow
def test_slurm_job_array_runs_each_pending_run_once(slurm, world, tmp_path):
    grid, runs = write_grid(world, tmp_path / "grid.toml"), tmp_path / "runs"
    env = {**without_script_settings(slurm.env), "SLURM_CONF": str(slurm.conf), "LOGS": str(runs),
           "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1", "ARRAY_PARALLEL": "2", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "SBATCH_ARGS": f"--gpus-per-node=0 --cpus-per-task=1 --mem=0 --time=15 "
                                                  f"--chdir={tmp_path}"}
    try:
        socket.gethostbyname(slurm.node)
    except OSError:  # a container whose hostname does not resolve: rendezvous on loopback instead
        env["MASTER_ADDR"] = "127.0.0.1"
    submit = subprocess.run(["bash", str(SWEEP_SH), str(grid)], capture_output=True, text=True, env=env, timeout=600)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = submit.stdout.strip().split(";")[0]
    assert "runs 0,1,2,3 of" in submit.stderr and "at most 2 at a time" in submit.stderr

    elements = wait_for_array(slurm, job, timeout=900)
    logs = {i: (runs / f"slurm-{job}_{i}.out") for i in "0123"}
    detail = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs.values() if p.exists())
    assert sorted(k for k in elements if k.isdigit()) == ["0", "1", "2", "3"], detail  # pending ones show as "2-3%2"
    assert {i: (elements[i]["JobState"], elements[i]["ExitCode"]) for i in "0123"} == \
        {i: ("COMPLETED", "0:0") for i in "0123"}, detail
    for i, name in enumerate(NAMES):  # each element ran its own run through po_launch
        log = logs[str(i)].read_text()
        assert f"open_clip_po: dpo beta=1 lambda=1 on 1 node(s) x 1 process(es), batch 8/process" in log
        assert log.rstrip().endswith(f"→ {runs / name / 'eval.json'}"), log[-2000:]
        assert json.loads((runs / name / "eval.json").read_text())["slurm_job"] == f"{job}_{i}"
    check_runs_and_report(runs)

    again = subprocess.run(["bash", str(SWEEP_SH), str(grid)], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "every run of" in again.stdout and "is done" in again.stdout
    assert sorted(p.name for p in runs.glob("slurm-*.out")) == sorted(p.name for p in logs.values())
    assert slurm.run(["squeue", "-h"]).stdout.strip() == ""


# -- bad grid files, refused before any run starts -------------------------------------------------------------------

def grid_file(path: Path, base: str, points: str = "") -> Path:
    path.write_text(f'[base]\n{base}\n[axes]\nlr = ["1e-3", "3e-3"]\n{points}\n[eval]\nimages = "test"\n'
                    'attack-on-the-fly = true\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("base, points, where, error", [
    ('po-loss = "dpo"\nmodel = "po-tiny"\npo-betta = 1', "", "[base]", "unrecognized arguments: --po-betta 1"),
    ('po-loss = "dpo"\nepochs = "three"', "", "[base]", "argument --epochs: invalid int value: 'three'"),
    ('po-loss = "dpo"', '[[points]]\nlr = "1e-2"\npo-candidates = "prompts"', "[[points]] #1",
     "argument --po-candidates: invalid choice: 'prompts' (choose from 'batch', 'classes')"),
])
def test_flags_the_trainer_would_refuse_stop_the_sweep_before_any_run(tmp_path, base, points, where, error):
    grid = grid_file(tmp_path / "grid.toml", base, points)
    runs = tmp_path / "runs"
    proc = run_module("open_clip_po.sweep", str(grid), "--out", str(runs), "--quiet", timeout=300)
    assert proc.returncode == 2
    stderr = proc.stderr.strip()
    assert stderr.startswith(f"python -m open_clip_po.sweep: error: {grid.resolve()} {where}: {error} ")
    assert stderr.endswith("nothing was started)") and "\n" not in stderr
    assert not runs.exists()  # no run folder, no plan
    # SLURM's planner refuses it the same way, before sbatch
    proc = run_module("open_clip_po.sweep.driver", "plan", str(grid), "--out", str(runs), timeout=300)
    assert proc.returncode == 2 and f"{where}: {error}" in proc.stderr and not runs.exists()


def test_a_grid_file_that_is_not_utf8_is_named(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_bytes('[base]\nmodel = "po-tiny"\n# caf\xe9 in Latin-1\n'.encode("latin-1"))
    with pytest.raises(GridError) as e:
        load_grid(grid)
    assert str(e.value) == (f"{grid}: not UTF-8 text (byte b'\\xe9' at offset 30); TOML files are UTF-8: save it as "
                            "UTF-8")
