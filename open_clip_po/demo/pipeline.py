"""The demo pipeline: world → pre-training (open_clip's trainer) → typographic shards → PO fine-tunes
(``torchrun -m open_clip_po.main``) → evaluation (``open_clip_po.eval``) → ``report.md`` / ``report.json``.

Every stage is the project's public CLI run as a subprocess (or, for evaluation, the CLI's ``main`` in-process to
save interpreter start-ups), so the demo exercises exactly what a user runs; the commands are logged in
``DIR/commands.txt``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from open_clip_po.checkpoint import CheckpointError, last_epoch_checkpoint
from open_clip_po.eval.cli import EvalCommandFailed
from open_clip_po.eval.cli import run as eval_cli_run

from .progress import PROGRESS_EVERY, duration, run_watched, stage_named, trainer_log
from .world import TEXT_SIZE_224

log = logging.getLogger("open_clip_po.demo")

TEMPLATE = "a photo of a {}."


@dataclasses.dataclass(frozen=True)
class Method:
    """One fine-tuning run: a name for the table, the objective and its flags."""
    name: str
    loss: str
    head: bool = False
    flags: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """The run's name on disk and on the command line: ``dpo``, ``dpo-head``, ..."""
        return self.name.lower().replace(" + ", "-").replace(" ", "-")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pre-training run of open_clip's trainer on its own images: how many per class, which kinds, epochs.

    The demo pre-trains in two stages, a curriculum: first mostly words (reading is slow to start and a small
    model otherwise settles on the easier colour-and-shape cue), then the whole world."""
    name: str
    per_class: int
    mix: tuple[float, float, float, float]   # object, labelled, word, sign
    epochs: int


HEAD_LR = "3e-2"
# IPO at β = 0.01 pulls towards a 50-nat margin without let-up; at 3e-2 the log head followed it to σ(W) up to 58
# (clean −25 points), at 3e-3 it lands where the dense head did at 3e-2 (docs/demo/head.md)
HEAD_LR_OF = {"ipo": "3e-3"}
# Weight decay on the log head's generator A (W = exp(A)) pulls W towards the identity: measured on this world, it
# keeps the t-sweep monotone in the written-class rate over t ∈ [−2, 3] (without it the rate rose by up to 2.6
# points between neighbouring t) with σ(W) in [0.70, 1.60] (docs/demo/head.md). Log heads only: on a dense W
# weight decay pulls towards 0, which is no regulariser of the knob.
HEAD_WD = "0.1"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    model: str = "po-small"
    num_classes: int = 24
    image_size: int = 64
    stages: tuple[Stage, ...] = (Stage("read", 500, (0.0, 0.2, 0.5, 0.3), 4),
                                 Stage("see", 500, (0.35, 0.25, 0.15, 0.25), 6))
    train_per_class: int = 40                                     # clean images → PO triplets + D_reg
    test_per_class: int = 50                                      # 1200 test images: standard error ≤ 1.4 points
    text_size_224: tuple[int, int] = TEXT_SIZE_224               # font size at 224 px, as the builder's --font-size
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 50
    po_attacks_per_image: int = 2                                 # triplets per clean training image
    po_epochs: int = 3
    po_batch_size: int = 32
    po_procs: int = 2
    methods: tuple[Method, ...] = ()
    sweep_t: str = "-2:3:0.5"
    head_wd: str | None = HEAD_WD                                 # --wd of the log heads
    head_param: str | None = None                                 # --po-head-param of the head runs (None:
                                                                  # the trainer's default for their towers)
    seed: int = 0
    quick: bool = False                                           # a pipeline check: its own targets, not the claim




def default_methods(quick: bool) -> tuple[Method, ...]:
    """DPO, IPO, KTO and the CE baseline, each as a full fine-tune and as a linear head (quick: DPO and CE).

    β and λ are the paper's (Sec. 4). Learning rates were tuned on this world: DPO's gradient fades as its
    margin grows, so it takes a larger step than IPO and KTO, whose stronger pull costs clean accuracy at 1e-3;
    CE, the baseline, gets the IPO/KTO rate. The heads take 3e-2, IPO's 3e-3 (see HEAD_LR_OF)."""
    hp = {
        "dpo": ("--po-beta", "1", "--po-reg-lambda", "1"),
        "ipo": ("--po-beta", "0.01", "--po-reg-lambda", "0.01"),
        "kto": ("--po-beta", "1.5", "--po-reg-lambda", "0.01"),
        "ce": ("--po-reg-lambda", "0"),
    }
    full_lr = {"dpo": "1e-3", "ipo": "3e-4", "kto": "3e-4", "ce": "3e-4"}
    losses = ("dpo", "ce") if quick else ("dpo", "ipo", "kto", "ce")
    out = []
    for loss in losses:
        out.append(Method(loss.upper(), loss, False, hp[loss] + ("--lr", full_lr[loss])))
        if not quick or loss == "dpo":
            out.append(Method(loss.upper() + " + head", loss, True, hp[loss] + ("--lr", HEAD_LR_OF.get(loss, HEAD_LR))))
    return tuple(out)


def full_config() -> DemoConfig:
    return DemoConfig(methods=default_methods(quick=False))


def quick_config() -> DemoConfig:
    """For CI (< 3 min on 2 cores): 8 classes, larger text, a words-only first stage (so reading starts within the
    short pre-training), DPO (full, head) and CE. The pre-trained model only starts to learn the world (it names
    the written class 20–30 % of the time, chance 12.5 %; clean 45–55 %), so this checks the pipeline and that
    DPO recovers attacked accuracy and reads less, not the full demo's claim."""
    return dataclasses.replace(DemoConfig(), num_classes=8, text_size_224=(64, 84),
                               stages=(Stage("read", 500, (0.0, 0.0, 1.0, 0.0), 4),
                                       Stage("see", 300, (0.35, 0.25, 0.15, 0.25), 4)), train_per_class=40,
                               po_epochs=4, methods=default_methods(quick=True), quick=True)


class StageError(RuntimeError):
    """A stage's command failed; the message names it and the log file."""


class Runner:
    """Runs the stages' commands, logging each to ``DIR/commands.txt`` and its output to ``DIR/logs/``; while a
    command runs, the console shows its log's path and its progress (``open_clip_po.demo.progress``)."""

    def __init__(self, out: Path, threads: int | None = None, progress_every: float = PROGRESS_EVERY):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.progress_every = progress_every
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)

    def run(self, stage: str, argv: list[str]) -> None:
        output, trainer = self.logs / f"{stage}.log", trainer_log(argv, self.out)
        with stage_named(stage, output):
            with open(self.out / "commands.txt", "a", encoding="utf-8") as f:
                f.write(shlex.join(argv) + "\n")
            log.info("[%s] %s", stage, shlex.join(argv))
            log.info("[%s] output: %s", stage, output if trainer is None else f"{output} (open_clip's log: {trainer})")
            t0 = time.perf_counter()
            returncode = run_watched(argv, stage, output, self.progress_every, env=self.env, cwd=self.out)
        self.timings[stage] = round(time.perf_counter() - t0, 1)
        if returncode != 0:
            tail = output.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            raise StageError(f"stage {stage!r} failed (exit {returncode}); see {output}: "
                             + (tail[-1] if tail else "no output"))
        log.info("[%s] done in %s", stage, duration(self.timings[stage]))

    def eval(self, stage: str, argv: list[str]) -> None:
        """``python -m open_clip_po.eval ARGV``, in this process, logged like the other stages."""
        with open(self.out / "commands.txt", "a", encoding="utf-8") as f:
            f.write(shlex.join([sys.executable, "-m", "open_clip_po.eval", *argv]) + "\n")
        with open(self.logs / f"{stage}.log", "w", encoding="utf-8") as logf, \
                contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf):
            self.timed(stage, run_eval, argv)

    def timed(self, stage: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in this process, timed as ``stage``."""
        t0 = time.perf_counter()
        with stage_named(stage):
            result = fn(*args, **kwargs)
        self.timings[stage] = round(time.perf_counter() - t0, 1)
        return result


def fresh(path: Path) -> Path:
    """Remove a previous run's output folder (only ever inside the demo's own output directory)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("open_clip_po.demo").setLevel(logging.INFO)  # our stages; open_clip's chatter stays quiet


def pretrained_path(value: str | None, prog: str) -> Path | None:
    """``--pretrained`` resolved; None if not given. Exits with a one-line error if it is not a file."""
    if value is None:
        return None
    path = Path(value).resolve()
    if not path.is_file():
        print(f"{prog}: error: --pretrained {value} is not a file", file=sys.stderr)
        raise SystemExit(2)
    return path


def checkpoint_of(logs: Path, run_name: str) -> Path:
    """The last numbered epoch checkpoint (``epoch_N.pt``, largest N) a run wrote under ``logs/run_name``."""
    try:
        return last_epoch_checkpoint(logs / run_name)
    except CheckpointError as e:
        raise StageError(str(e)) from None


def run_eval(argv: list[str]) -> None:
    """``python -m open_clip_po.eval ARGV`` in this process (saves a start-up per evaluation)."""
    try:
        eval_cli_run(argv)
    except EvalCommandFailed as e:
        raise StageError(str(e)) from None


def read_metrics(path: Path) -> dict:
    m = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    return {"clean": m["clean_top1"], "attacked": m["typographic_top1"], "written_rate": m["written_rate"]}
