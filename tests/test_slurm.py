"""SLURM scripts (scripts/slurm/): shell quality, the launch command they build, and a real job on a one-node
SLURM brought up on loopback (munged, slurmctld, slurmd in a temp dir; stopped again by PID).

The cluster tests skip, saying why, when SLURM is not installed (`apt-get install slurmctld slurmd slurm-client
munge`, as .ci/run does), when not root, or when a daemon does not come up.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from slurm_cluster import without_script_settings, start_or_skip

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
SCRIPT_FILES = [SCRIPTS / name for name in ("common.sh", "typographic.sh", "gender.sh", "sweep.sh")]


# -- shell quality -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPT_FILES, ids=lambda p: p.name)
def test_bash_n(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPT_FILES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the command the scripts build (torchrun and srun replaced by recorders) -------------------------------------

RECORDER = """#!/usr/bin/env bash
# Records a torch.distributed.run launch as JSON lines; everything else goes to the real python.
if [ "${1:-} ${2:-}" = "-m torch.distributed.run" ]; then
    shift 2
    exec "$REAL_PYTHON" -c 'import json, sys; print("LAUNCH " + json.dumps(sys.argv[1:]))' "$@"
fi
exec "$REAL_PYTHON" "$@"
"""

FAKE_SLURM = {
    # srun: drop its options, run the command once (one node is enough to see the argv).
    "srun": """#!/usr/bin/env bash
echo "SRUN $*" | cut -d' ' -f1-3 >&2
while [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
""",
    "scontrol": """#!/usr/bin/env bash
case "$1 $2" in
    # The rest comes late, as from a slow scontrol: a reader that stops early (head -n1) gets SIGPIPE'd here.
    "show hostnames") echo gpu-node-07; sleep 0.3; printf 'gpu-node-%s\\n' 08 09 10 ;;
    "show job") printf 'JobId=%s JobName=x\\n   Command=%s\\n   WorkDir=/tmp\\n' "$3" "$FAKE_SUBMITTED_SCRIPT --po-template a/photo/of/{}" ;;
    *) exit 1 ;;
esac
""",
}


def _write_shards(folder: Path, shards: int, per_shard: int) -> None:
    """Triplet shards in the README's format, plus clean reg- shards and sizes.json."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for kind in ("pref", "reg"):
        for shard in range(shards):
            name = f"{kind}-{shard:06d}.tar"
            with tarfile.open(folder / name, "w") as tar:
                for i in range(per_shard):
                    key = f"{shard:03d}{i:04d}"
                    colour = ((shard * 97 + i * 31) % 256, (i * 53) % 256, (shard * 11) % 256)
                    png = io.BytesIO()
                    Image.new("RGB", (64, 64), colour).save(png, format="PNG")
                    members = {f"{key}.png": png.getvalue()}
                    true_caption, written = f"a photo of a class{i % 4}.", f"a photo of a class{(i + 1) % 4}."
                    members[f"{key}.txt"] = true_caption.encode()
                    if kind == "pref":
                        members[f"{key}.yw.txt"] = true_caption.encode()
                        members[f"{key}.yl.txt"] = written.encode()
                        members[f"{key}.json"] = json.dumps({"label": i % 4, "written": (i + 1) % 4}).encode()
                    for member, data in members.items():
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))


@pytest.fixture
def recorder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"python": RECORDER, **FAKE_SLURM}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    _write_shards(tmp_path / "data", shards=2, per_shard=1)
    # The sample count comes from sizes.json only; make it the paper's scale without writing 10k images.
    (tmp_path / "data" / "sizes.json").write_text(json.dumps({"pref-000000.tar": 6000, "pref-000001.tar": 4240,
                                                             "reg-000000.tar": 1, "reg-000001.tar": 1}))
    clean = without_script_settings(os.environ)

    def launch(script: str, slurm: dict | None = None, extra: list[str] = (), **env) -> tuple[int, dict, str]:
        run_env = {**clean, "PATH": f"{bin_dir}:{clean['PATH']}", "REAL_PYTHON": sys.executable,
                   "PYTHON": str(bin_dir / "python"), "DATA_DIR": str(tmp_path / "data"),
                   "LOGS": str(tmp_path / "logs"), "FAKE_SUBMITTED_SCRIPT": str(SCRIPTS / script),
                   **(slurm or {}), **env}
        out = subprocess.run(["bash", str(SCRIPTS / script), *extra], env=run_env, capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
        lines = [l for l in out.stdout.splitlines() if l.startswith("LAUNCH ")]
        argv = json.loads(lines[0][len("LAUNCH "):]) if lines else []
        return out.returncode, argv, out.stdout + out.stderr

    return launch


def _options(argv: list[str]) -> tuple[dict, dict]:
    """Split a recorded launch into torchrun's options and the training options (after -m open_clip_po.main)."""
    cut = argv.index("-m")
    assert argv[cut + 1] == "open_clip_po.main"

    def pairs(tokens):
        opts, i = {}, 0
        while i < len(tokens):
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                opts[tokens[i]] = tokens[i + 1]
                i += 2
            else:
                opts[tokens[i]] = True
                i += 1
        return opts

    return pairs(argv[:cut]), pairs(argv[cut + 2:])


@pytest.mark.parametrize("loss, beta, reg_lambda", [("dpo", "1", "1"), ("ipo", "0.01", "0.01"), ("kto", "1.5", "0.01")])
def test_typographic_defaults_are_the_papers(recorder, loss, beta, reg_lambda):
    code, argv, log = recorder("typographic.sh", PO_LOSS=loss)
    assert code == 0, log
    launcher, train = _options(argv)
    assert launcher == {"--nnodes": "1", "--nproc-per-node": "8", "--rdzv-backend": "c10d",
                        "--rdzv-endpoint": launcher["--rdzv-endpoint"], "--rdzv-id": launcher["--rdzv-id"]}
    # 10240 samples / 512 = 20 steps per epoch, x 3 epochs = 60 steps; 10 % warm-up = 6.
    assert {k: train[k] for k in ("--po-loss", "--po-beta", "--po-reg-lambda", "--lr", "--batch-size", "--epochs",
                                  "--opt", "--warmup", "--lr-scheduler", "--seed", "--precision", "--dist-backend",
                                  "--model", "--pretrained")} == {
        "--po-loss": loss, "--po-beta": beta, "--po-reg-lambda": reg_lambda, "--lr": "2e-5", "--batch-size": "64",
        "--epochs": "3", "--opt": "timm/adamax", "--warmup": "6", "--lr-scheduler": "cosine", "--seed": "0",
        "--precision": "amp", "--dist-backend": "nccl", "--model": "ViT-B-32", "--pretrained": "openai"}
    assert train["--train-data"].endswith("data/pref-{000000..000001}.tar")
    assert train["--po-reg-data"].endswith("data/reg-{000000..000001}.tar")
    assert train["--logs-dir"].endswith("logs") and "--logs" not in train  # torchrun would swallow --logs


def test_ce_baseline_gets_no_beta_and_no_regulariser(recorder):
    code, argv, log = recorder("typographic.sh", PO_LOSS="ce")
    assert code == 0, log
    _, train = _options(argv)
    assert train["--po-loss"] == "ce" and train["--po-reg-lambda"] == "0" and "--po-beta" not in train
    code, argv, log = recorder("typographic.sh", PO_LOSS="ce", PO_BETA="1")
    assert code != 0 and argv == [] and "error: PO_LOSS=ce has no beta: unset PO_BETA" in log


def test_gender_uses_beta_lambda_one_and_the_linear_head(recorder):
    code, argv, log = recorder("gender.sh", PO_LOSS="ipo", extra=["--po-average", "bma"])
    assert code == 0, log
    _, train = _options(argv)
    assert (train["--po-loss"], train["--po-beta"], train["--po-reg-lambda"]) == ("ipo", "1", "1")
    assert train["--po-linear-head"] is True and train["--po-average"] == "bma"  # extra arguments pass through
    assert train["--po-head-towers"] == "both"  # the paper's head unless asked


def test_gender_head_towers(recorder):
    code, argv, log = recorder("gender.sh", HEAD_TOWERS="image")
    assert code == 0, log
    assert _options(argv)[1]["--po-head-towers"] == "image"
    code, argv, log = recorder("gender.sh", HEAD_TOWERS="text")
    assert code != 0 and argv == [] and "error: HEAD_TOWERS must be both or image, got 'text'" in log
    code, argv, log = recorder("gender.sh", HEAD_TOWERS="image", LINEAR_HEAD="0")
    assert code != 0 and argv == [] and "error: HEAD_TOWERS=image needs LINEAR_HEAD=1" in log


def test_multi_node_rendezvous_on_the_first_node(recorder):
    slurm = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu-node-[07-10]",
             "SLURM_JOB_NAME": "po-typographic", "SLURM_CPUS_PER_TASK": "64"}
    code, argv, log = recorder("typographic.sh", slurm=slurm, PO_LOSS="kto")
    assert code == 0, log
    assert "SRUN --ntasks-per-node=1 --kill-on-bad-exit=1" in log  # one torchrun per node
    launcher, train = _options(argv)
    assert launcher["--nnodes"] == "4" and launcher["--nproc-per-node"] == "8"
    assert launcher["--rdzv-endpoint"] == f"gpu-node-07:{20000 + 123456 % 20000}"
    assert launcher["--rdzv-id"] == "123456"
    assert train["--batch-size"] == "16"  # 512 / (4 nodes x 8 GPUs)
    assert train["--name"] == "po-typographic-kto-123456" and train["--workers"] == "7"


def test_cpu_mode_and_overrides(recorder):
    code, argv, log = recorder("typographic.sh", GPUS_PER_NODE="0", NPROC_PER_NODE="2", GLOBAL_BATCH="8",
                               MODEL="po-tiny", PRETRAINED="", REG_DATA="", WARMUP="3", LR="1e-3")
    assert code == 0, log
    launcher, train = _options(argv)
    assert launcher["--nproc-per-node"] == "2"
    assert (train["--dist-backend"], train["--precision"], train["--batch-size"]) == ("gloo", "fp32", "4")
    assert (train["--model"], train["--warmup"], train["--lr"]) == ("po-tiny", "3", "1e-3")
    assert "--pretrained" not in train and "--po-reg-data" not in train


@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "3"}, "GLOBAL_BATCH=512 is not divisible by 3 processes; set BATCH_SIZE"),
    ({"PO_LOSS": "hinge"}, "PO_LOSS=hinge has no paper defaults: set PO_BETA and PO_REG_LAMBDA"),
    ({"DATA_DIR": "/nonexistent"}, "no /nonexistent/pref-*.tar: set DATA_DIR or TRAIN_DATA"),
    ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE must be a whole number, got 'eight'"),
])
def test_bad_settings_stop_before_launch(recorder, env, message):
    code, argv, log = recorder("typographic.sh", **env)
    assert code != 0 and argv == [] and f"error: {message}" in log


def _launches(log: str) -> list[list[str]]:
    return [json.loads(line[len("LAUNCH "):]) for line in log.splitlines() if line.startswith("LAUNCH ")]


def _captions(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".yw.txt")]


def test_typographic_recipe_builds_triplets_trains_and_benchmarks(recorder, tmp_path):
    """IMAGENET_TRAIN: the ImageNet-100 triplets are built into an empty DATA_DIR (for real) before training;
    BENCHMARK_ROOT: after training, eval benchmark of the newest checkpoint beside the pre-trained model."""
    from benchmark_helpers import write_imagenet_val, write_wds_set
    from open_clip_po.data.imagenet100 import WNIDS

    write_imagenet_val(tmp_path / "in", WNIDS)
    write_wds_set(tmp_path / "bench" / "wds_vtab-pets", ["Beagle", "Boxer"], per_class=1)
    checkpoints = tmp_path / "logs" / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for epoch in (2, 10):  # the newest by number, not by name
        (checkpoints / f"epoch_{epoch}.pt").write_bytes(b"")
    code, train_argv, log = recorder("typographic.sh", DATA_DIR=str(tmp_path / "fresh"), NAME="run",
                                     IMAGENET_TRAIN=str(tmp_path / "in" / "imagenet" / "val"),
                                     BENCHMARK_ROOT=str(tmp_path / "bench"), BENCHMARK_DATASETS="pets")
    assert code == 0, log
    assert "pets: wds at" in log  # the data sets were checked before training
    sizes = json.loads((tmp_path / "fresh" / "sizes.json").read_text())
    assert sum(n for shard, n in sizes.items() if shard.startswith("pref-")) == 100
    assert all(p.startswith("an image of a ") for p in _captions(tmp_path / "fresh" / "pref-000000.tar"))
    _, train = _options(train_argv)
    assert train["--po-average"] == "bma" and train["--train-data"].endswith("fresh/pref-000000.tar")  # 100 < 1000
    benchmark = _launches(log)[1]
    cut = benchmark.index("-m")
    assert benchmark[:cut] == ["--standalone", "--nproc-per-node", "8"]
    assert benchmark[cut:cut + 3] == ["-m", "open_clip_po.eval", "benchmark"]
    text = " ".join(benchmark)
    assert f"--pretrained openai {checkpoints}/epoch_10.pt --label pre-trained --label dpo --weights raw bma" in text
    for part in ("--datasets pets", f"--dataset-root {tmp_path}/bench", "--typographic", "--device cuda", "--amp",
                 "--templates defense-prefix",
                 f"--output {tmp_path}/logs/run/benchmark"):
        assert part in text


# -- a real SLURM on loopback ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    cluster = start_or_skip(cpus=2)
    yield cluster
    cluster.stop()


@pytest.mark.slurm
@pytest.mark.integration
def test_loopback_cluster_runs_a_two_task_step(slurm, tmp_path):
    job = slurm.submit(["--ntasks=2", "--gpus-per-node=0", f"--output={tmp_path}/%j.out",
                        "--wrap", "srun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS'"])
    state = slurm.wait(job, timeout=60)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0")
    lines = sorted((tmp_path / f"{job}.out").read_text().split("\n"))
    assert [l for l in lines if l] == ["task 0 of 2", "task 1 of 2"]


def _typographic_job(slurm, tmp_path, env, sbatch_args):
    """sbatch typographic.sh (cluster-specific #SBATCH lines overridden on the command line, as a user of a CPU
    partition would), wait for it, and require it COMPLETED; returns (job id, state, job log)."""
    job = slurm.submit(["--gpus-per-node=0", *sbatch_args, "--mem=0", "--time=10", f"--chdir={tmp_path}",
                        str(SCRIPTS / "typographic.sh"), "--log-every-n-steps", "1"], env=env)
    state = slurm.wait(job, timeout=480)
    log_file = tmp_path / "logs" / f"po-typographic-{job}.out"
    log = log_file.read_text(errors="replace") if log_file.exists() else "(no log file)"
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    return job, state, log


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.slow
def test_typographic_job_trains_and_checkpoints(slurm, tmp_path):
    from open_clip_po.checkpoint import load_checkpoint

    _write_shards(tmp_path / "data", shards=2, per_shard=8)
    (tmp_path / "logs").mkdir()  # sbatch opens logs/%x-%j.out before the script runs
    env = {**without_script_settings(slurm.env), "SLURM_CONF": str(slurm.conf), "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2", "GLOBAL_BATCH": "8", "EPOCHS": "1",
           "MODEL": "po-tiny", "PRETRAINED": "", "WORKERS": "0", "DATA_DIR": str(tmp_path / "data"),
           "LOGS": str(tmp_path / "logs"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    try:
        socket.gethostbyname(slurm.node)
    except OSError:  # a container whose hostname does not resolve: rendezvous on loopback instead
        env["MASTER_ADDR"] = "127.0.0.1"
    job, state, log = _typographic_job(slurm, tmp_path, env, ["--cpus-per-task=2"])

    assert "open_clip_po: dpo beta=1 lambda=1 on 1 node(s) x 2 process(es), batch 4/process" in log
    run = tmp_path / "logs" / f"po-typographic-dpo-{job}"
    train_log = (run / "out.log").read_text()
    assert "Train Epoch: 0 [16/16 (100%)]" in train_log, train_log[-3000:]
    params = {key: value.strip() for key, _, value in
              (line.partition(":") for line in (run / "params.txt").read_text().splitlines())}
    assert (params["po_loss"], params["world_size"], params["batch_size"], params["opt"]) == (
        "dpo", "2", "4", "timm/adamax")
    ckpt = load_checkpoint(run / "checkpoints" / "epoch_1.pt")
    assert ckpt["epoch"] == 1 and ckpt["name"] == run.name
    assert any(k.endswith("logit_scale") for k in ckpt["state_dict"])



def test_missing_benchmark_data_stops_before_training(recorder, tmp_path):
    code, argv, log = recorder("typographic.sh", BENCHMARK_ROOT=str(tmp_path / "nothing"),
                               BENCHMARK_DATASETS="pets,rta100")
    assert code != 0 and argv == []
    assert "error: pets: no test split found" in log and "rta100: not found" in log


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.slow
def test_typographic_recipe_job_writes_table1(slurm, tmp_path):
    """The paper's recipe as one job: ImageNet-100 → triplets → DPO with BMA (2 CPU processes) → eval benchmark
    (2 processes) → Table 1 in the run's folder."""
    import open_clip
    import torch

    import open_clip_po  # noqa: F401  (registers po-tiny)
    from benchmark_helpers import save_checkpoint, write_imagenet_val, write_wds_set
    from open_clip_po.data.imagenet100 import WNIDS

    write_imagenet_val(tmp_path / "in", WNIDS)
    bench = tmp_path / "bench"
    write_wds_set(bench / "wds_vtab-pets", ["Abyssinian", "Beagle", "Bengal", "Birman", "Boxer"], per_class=2)
    write_imagenet_val(bench, WNIDS)
    torch.manual_seed(0)
    pretrained = save_checkpoint(open_clip.create_model("po-tiny"), tmp_path / "pretrained.pt")
    (tmp_path / "logs").mkdir()
    env = {**without_script_settings(slurm.env), "SLURM_CONF": str(slurm.conf), "GPUS_PER_NODE": "0",
           "NPROC_PER_NODE": "2", "GLOBAL_BATCH": "8", "EPOCHS": "1", "MODEL": "po-tiny",
           "PRETRAINED": str(pretrained), "WORKERS": "0", "DATA_DIR": str(tmp_path / "data"),
           "LOGS": str(tmp_path / "logs"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "IMAGENET_TRAIN": str(tmp_path / "in" / "imagenet" / "val"), "BENCHMARK_ROOT": str(bench),
           "BENCHMARK_DATASETS": "pets,imagenet100", "TRIPLET_SHARD_SIZE": "25"}  # 4 shards for 2 readers
    try:
        socket.gethostbyname(slurm.node)
    except OSError:
        env["MASTER_ADDR"] = "127.0.0.1"
    job, state, log = _typographic_job(slurm, tmp_path, env, ["--cpus-per-task=2"])
    run = tmp_path / "logs" / f"po-typographic-dpo-{job}"
    assert "building ImageNet-100 triplets" in log and "Train Epoch: 0" in (run / "out.log").read_text()
    table = (run / "benchmark" / "table1.md").read_text()
    assert "| Method | OxfordPets O | OxfordPets T | ImageNet-100 O | ImageNet-100 T |" in table
    assert "| pre-trained |" in table and "| dpo |" in table
    results = json.loads((run / "benchmark" / "results.json").read_text())
    assert results["processes"] == 2 and [r["weights"] for r in results["rows"]] == ["raw", "bma"]
    assert results["rows"][1]["datasets"]["imagenet100"]["metrics"]["typographic"]["num_samples"] == 100
    assert (run / "benchmark" / "table1.png").is_file()


@pytest.fixture(scope="module")
def slurm_two_nodes():
    cluster = start_or_skip(cpus=1, nodes=2)
    yield cluster
    cluster.stop()


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.slow
def test_two_node_job_meets_through_the_first_nodes_address(slurm_two_nodes, tmp_path):
    """sbatch --nodes=2 on two slurmds of this machine: one torchrun per node, rendezvous at po0's NodeAddr."""
    from open_clip_po.checkpoint import load_checkpoint

    slurm = slurm_two_nodes
    _write_shards(tmp_path / "data", shards=2, per_shard=8)  # one shard per rank
    (tmp_path / "logs").mkdir()
    env = {**without_script_settings(slurm.env), "SLURM_CONF": str(slurm.conf), "GPUS_PER_NODE": "0",
           "NPROC_PER_NODE": "1", "GLOBAL_BATCH": "8", "EPOCHS": "1", "MODEL": "po-tiny", "PRETRAINED": "",
           "WORKERS": "0", "DATA_DIR": str(tmp_path / "data"), "LOGS": str(tmp_path / "logs"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    job, state, log = _typographic_job(slurm, tmp_path, env, ["--nodes=2", "--cpus-per-task=1"])
    assert state["NodeList"] == "po[0-1]" and state["NumNodes"] == "2"
    assert "open_clip_po: dpo beta=1 lambda=1 on 2 node(s) x 1 process(es), batch 4/process" in log
    run = tmp_path / "logs" / f"po-typographic-dpo-{job}"
    params = (run / "params.txt").read_text()
    # 1 process per node, world size 2: the second node's torchrun joined the first's rendezvous
    assert "world_size: 2" in params and "batch_size: 4" in params
    assert "Train Epoch: 0 [16/16 (100%)]" in (run / "out.log").read_text()
    ckpt = load_checkpoint(run / "checkpoints" / "epoch_1.pt")
    assert ckpt["epoch"] == 1 and all(k.startswith("module.") for k in ckpt["state_dict"])
