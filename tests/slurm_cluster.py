"""A one-node SLURM on loopback for tests: a private munged (own key and socket), slurmctld -D and slurmd -D in a
temp dir, stopped again by PID. ``SlurmCluster(cpus).start()`` raises ``SlurmUnavailable`` (say why, and skip)
when SLURM is not installed (`apt-get install slurmctld slurmd slurm-client munge`), when not root, or when a
daemon does not come up."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

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


# What the scripts read from the environment: none of it may leak in from the shell running the tests.
SCRIPT_SETTINGS = {"TRAIN_DATA", "REG_DATA", "DATA_DIR", "MODEL", "PRETRAINED", "LOGS", "NAME", "GLOBAL_BATCH",
                   "BATCH_SIZE", "LR", "EPOCHS", "OPT", "EPS", "WD", "WARMUP", "WARMUP_FRACTION", "SEED", "WORKERS",
                   "PRECISION", "TRAIN_NUM_SAMPLES", "LINEAR_HEAD", "PYTHON", "MASTER_ADDR", "MASTER_PORT",
                   "IMAGENET_TRAIN", "IMAGENET100_DIR", "TRIPLET_TEMPLATE", "TRIPLET_SHARD_SIZE", "BENCHMARK_ROOT", "BENCHMARK_DATASETS", "BENCHMARK_TEMPLATES",
                   "PAINT_FT", "PAINT_ALPHA"}


def without_script_settings(env) -> dict:
    return {k: v for k, v in env.items()
            if k not in SCRIPT_SETTINGS and not k.startswith(("SLURM_", "PO_", "GPUS_", "NPROC_"))}


def start_or_skip(cpus: int = 2, nodes: int = 1) -> SlurmCluster:
    """A started cluster, or pytest.skip with the reason."""
    import pytest

    cluster = SlurmCluster(cpus=cpus, nodes=nodes)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM on loopback: {e}")
    return cluster
