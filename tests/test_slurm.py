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
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
SCRIPT_FILES = [SCRIPTS / name for name in ("common.sh", "typographic.sh", "gender.sh")]

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge"


class SlurmUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    # munged, slurmctld and slurmd live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all on 127.0.0.1.

    With ``nodes > 1`` every node is a slurmd of its own (``slurmd -N name``, own port, spool, pid and log
    file): SLURM's multiple-slurmd mode, for development and tests — Debian's slurm-wlm is built with it.
    """

    def __init__(self, cpus: int = 2, nodes: int = 1):
        self.cpus, self.num_nodes = cpus, nodes
        self.processes: list[subprocess.Popen] = []
        self.root: Path | None = None

    # -- bring-up ----------------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        missing = [b for b in BINARIES if _which(b) is None]
        if missing:
            raise SlurmUnavailable(f"SLURM is not installed (missing {', '.join(missing)}; {INSTALL_HINT})")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd needs root (it runs jobs as their user)")
        # munged refuses a socket whose parent directories are not world-executable, so no pytest tmp_path here.
        self.root = Path(tempfile.mkdtemp(prefix="po-slurm-"))
        self.root.chmod(0o755)
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            for node in self.nodes:
                name = "slurmd" if len(self.nodes) == 1 else f"slurmd-{node}"
                self._spawn(name, [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
            self._wait_for_idle_node()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        proc.name = name
        self.processes.append(proc)
        return proc

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = self.root / "munge.socket"
        self._spawn("munged", [
            _which("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
            f"--seed-file={self.root / 'munged.seed'}",
        ])
        self._wait(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")

    def _write_config(self) -> None:
        self.node = socket.gethostname().split(".")[0]
        host = self.node
        self.nodes = [self.node] if self.num_nodes == 1 else [f"po{i}" for i in range(self.num_nodes)]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        if self.num_nodes == 1:
            slurmd_files = [f"SlurmdPort={_free_port()}", f"SlurmdSpoolDir={self.root / 'spool'}",
                            f"SlurmdPidFile={self.root / 'slurmd.pid'}", f"SlurmdLogFile={self.root / 'slurmd.log'}"]
            node_lines = [f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN"]
        else:  # %n: the node name, so the slurmds do not share files
            slurmd_files = [f"SlurmdSpoolDir={self.root / 'spool'}/%n", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
                            f"SlurmdLogFile={self.root}/slurmd-%n.log"]
            for node in self.nodes:
                (self.root / "spool" / node).mkdir()
            node_lines = [f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
                          f"CPUs={self.cpus} State=UNKNOWN" for node in self.nodes]
        self.conf = self.root / "slurm.conf"
        self.conf.write_text("\n".join([
            "ClusterName=potest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={_free_port()}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            *slurmd_files,
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            *node_lines,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _wait_for_idle_node(self) -> None:
        def idle():
            out = self.run(["sinfo", "-N", "-h", "-o", "%T"], check=False).stdout.split()
            return len(out) == len(self.nodes) and all(state.startswith("idle") for state in out)

        self._wait(idle, 30, "the nodes did not become idle")

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.name for p in self.processes if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited: {self.log_tail()}")
            if condition():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        tails = []
        for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")):
            text = path.read_text(errors="replace").strip().splitlines()
            if text:
                tails.append(f"[{path.name}] " + " | ".join(text[-lines:]))
        return " ".join(tails) or "(no daemon output)"

    # -- use ---------------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, **kw)

    def submit(self, argv: list[str], **kw) -> str:
        """sbatch --parsable ARGV → job id."""
        out = self.run(["sbatch", "--parsable", *argv], **kw)
        return out.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> dict:
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, timeout: float) -> dict:
        """Wait until the job leaves PENDING/RUNNING; returns scontrol's fields for it."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return state
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)
                raise TimeoutError(f"job {job_id} still {state['JobState']} after {timeout:.0f} s")
            time.sleep(1)

    # -- tear-down ---------------------------------------------------------------------------------------------
    def stop(self) -> None:
        # slurmd first, so no job is left behind without its daemon; then the controller, then munge.
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


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


# What the scripts read from the environment: none of it may leak in from the shell running the tests.
SCRIPT_SETTINGS = {"TRAIN_DATA", "REG_DATA", "DATA_DIR", "MODEL", "PRETRAINED", "LOGS", "NAME", "GLOBAL_BATCH",
                   "BATCH_SIZE", "LR", "EPOCHS", "OPT", "EPS", "WD", "WARMUP", "WARMUP_FRACTION", "SEED", "WORKERS",
                   "PRECISION", "TRAIN_NUM_SAMPLES", "LINEAR_HEAD", "PYTHON", "MASTER_ADDR", "MASTER_PORT"}


def _without_script_settings(env) -> dict:
    return {k: v for k, v in env.items()
            if k not in SCRIPT_SETTINGS and not k.startswith(("SLURM_", "PO_", "GPUS_", "NPROC_"))}


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
    clean = _without_script_settings(os.environ)

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


def test_gender_uses_beta_lambda_one_and_the_linear_head(recorder):
    code, argv, log = recorder("gender.sh", PO_LOSS="ipo", extra=["--po-average", "bma"])
    assert code == 0, log
    _, train = _options(argv)
    assert (train["--po-loss"], train["--po-beta"], train["--po-reg-lambda"]) == ("ipo", "1", "1")
    assert train["--po-linear-head"] is True and train["--po-average"] == "bma"  # extra arguments pass through


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


# -- a real SLURM on loopback ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    cluster = SlurmCluster(cpus=2)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM on loopback: {e}")
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


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.slow
def test_typographic_job_trains_and_checkpoints(slurm, tmp_path):
    from open_clip_po.checkpoint import load_checkpoint

    _write_shards(tmp_path / "data", shards=2, per_shard=8)
    (tmp_path / "logs").mkdir()  # sbatch opens logs/%x-%j.out before the script runs
    env = {**_without_script_settings(slurm.env), "SLURM_CONF": str(slurm.conf), "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2", "GLOBAL_BATCH": "8", "EPOCHS": "1",
           "MODEL": "po-tiny", "PRETRAINED": "", "WORKERS": "0", "DATA_DIR": str(tmp_path / "data"),
           "LOGS": str(tmp_path / "logs"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    try:
        socket.gethostbyname(slurm.node)
    except OSError:  # a container whose hostname does not resolve: rendezvous on loopback instead
        env["MASTER_ADDR"] = "127.0.0.1"
    # Cluster-specific #SBATCH lines overridden on the command line, as a user of a CPU partition would.
    job = slurm.submit(["--gpus-per-node=0", "--cpus-per-task=2", "--mem=0", "--time=10",
                        f"--chdir={tmp_path}", str(SCRIPTS / "typographic.sh"), "--log-every-n-steps", "1"],
                       env=env)
    state = slurm.wait(job, timeout=480)
    log_file = tmp_path / "logs" / f"po-typographic-{job}.out"
    log = log_file.read_text(errors="replace") if log_file.exists() else "(no log file)"
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]

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


@pytest.fixture(scope="module")
def slurm_two_nodes():
    cluster = SlurmCluster(cpus=1, nodes=2)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no two-node SLURM on loopback: {e}")
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
    env = {**_without_script_settings(slurm.env), "SLURM_CONF": str(slurm.conf), "GPUS_PER_NODE": "0",
           "NPROC_PER_NODE": "1", "GLOBAL_BATCH": "8", "EPOCHS": "1", "MODEL": "po-tiny", "PRETRAINED": "",
           "WORKERS": "0", "DATA_DIR": str(tmp_path / "data"), "LOGS": str(tmp_path / "logs"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    job = slurm.submit(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=10",
                        f"--chdir={tmp_path}", str(SCRIPTS / "typographic.sh"), "--log-every-n-steps", "1"],
                       env=env)
    state = slurm.wait(job, timeout=480)
    log_file = tmp_path / "logs" / f"po-typographic-{job}.out"
    log = log_file.read_text(errors="replace") if log_file.exists() else "(no log file)"
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert state["NodeList"] == "po[0-1]" and state["NumNodes"] == "2"
    assert "open_clip_po: dpo beta=1 lambda=1 on 2 node(s) x 1 process(es), batch 4/process" in log
    run = tmp_path / "logs" / f"po-typographic-dpo-{job}"
    params = (run / "params.txt").read_text()
    # 1 process per node, world size 2: the second node's torchrun joined the first's rendezvous
    assert "world_size: 2" in params and "batch_size: 4" in params
    assert "Train Epoch: 0 [16/16 (100%)]" in (run / "out.log").read_text()
    ckpt = load_checkpoint(run / "checkpoints" / "epoch_1.pt")
    assert ckpt["epoch"] == 1 and all(k.startswith("module.") for k in ckpt["state_dict"])
