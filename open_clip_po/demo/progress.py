"""What the console shows while a demo stage's command runs as a subprocess.

- where its output goes (``DIR/logs/STAGE.log``, and open_clip's own ``out.log`` for a training run);
- a progress line at least every ``every`` seconds: for a training stage the step counter read from open_clip's
  ``Train Epoch: E [n/N (p%)]`` lines in that output (epoch, samples, share of the stage, rate and ETA), for any
  other stage its elapsed time and last output line;
- Ctrl-C: the subprocess is stopped (SIGINT, then SIGTERM, then SIGKILL) and ``StageInterrupted`` is raised with a
  one-line message, without the chained tracebacks ``subprocess.run`` would print.
"""
from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger("open_clip_po.demo")

PROGRESS_EVERY = 20.0   # seconds between progress lines: well inside the 30 s a user waits before wondering
POLL = 0.5              # seconds between reads of the stage's output
# open_clip_train.train (and open_clip_po.trainer.epoch) log each step window as
# "Train Epoch: 0 [  512/12000 (4%)] Data (t): ..." — epoch from 0, samples so far / samples per epoch.
TRAIN_LINE = re.compile(r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<done>\d+)/(?P<total>\d+) \(")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; the message names the stage and its log. A KeyboardInterrupt, so nothing on the way
    out mistakes it for a failed stage."""


def interrupted_line(prog: str, error: KeyboardInterrupt) -> str:
    """The one line a demo command prints when Ctrl-C stops it."""
    return f"{prog}: interrupted" + (f" {error}" if str(error) else "") + "; rerun the command to start again"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def flag_value(argv: list[str], *flags: str) -> str | None:
    """The value of the last of ``flags`` in ``argv`` (``--flag value`` or ``--flag=value``), or None."""
    value = None
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg[len(flag) + 1:]
    return value


def trainer_log(argv: list[str], cwd: Path) -> Path | None:
    """``LOGS/NAME/out.log``, open_clip's own log of a training command (None if the command names no run)."""
    name, logs = flag_value(argv, "--name"), flag_value(argv, "--logs", "--logs-dir")
    return None if name is None or logs is None else (cwd / logs / name / "out.log")


class StageProgress:
    """The state of one stage, read from its output; ``line(now)`` says it in one line."""

    def __init__(self, stage: str, epochs: int | None, start: float):
        self.stage, self.epochs, self.start = stage, epochs, start
        self.last_output = ""
        self.step = None        # (epoch, samples done in it, samples per epoch)
        self.first = None       # (time, samples done in the stage) at the first step line: the rate leaves start-up out

    def samples_done(self) -> int:
        epoch, done, total = self.step
        return epoch * total + done

    def feed(self, line: str, now: float) -> None:
        line = line.strip()
        if not line:
            return
        self.last_output = line
        match = TRAIN_LINE.search(line)
        if match:
            self.step = tuple(int(match.group(k)) for k in ("epoch", "done", "total"))
            if self.first is None:
                self.first = (now, self.samples_done())

    def line(self, now: float) -> str:
        elapsed = duration(now - self.start)
        if self.step is None:
            if self.epochs is not None:
                return f"[{self.stage}] {elapsed}: starting, no training step logged yet"
            return f"[{self.stage}] {elapsed}" + (f": {self.last_output[-120:]}" if self.last_output else "")
        epoch, done, total = self.step
        text = f"[{self.stage}] epoch {epoch + 1}" + (f"/{self.epochs}" if self.epochs else "")
        text += f", {done}/{total} samples"
        if not self.epochs:
            return text + f" ({elapsed})"
        stage_total = self.epochs * total
        text += f", {100 * self.samples_done() / stage_total:.0f}% of the stage"
        t0, s0 = self.first
        rate = (self.samples_done() - s0) / (now - t0) if now > t0 and self.samples_done() > s0 else None
        if rate:
            text += f", {rate:.1f} samples/s, ETA {duration((stage_total - self.samples_done()) / rate)}"
        return text + f" ({elapsed})"


class OutputFollower:
    """Reads what a subprocess has appended to its log file since the last call, line by line (``\\r`` too:
    progress bars redraw with it)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        pieces = re.split(r"[\r\n]", self.partial + chunk)
        self.partial = pieces.pop()
        return pieces


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End ``proc``: it may have had the terminal's SIGINT already; then SIGINT, SIGTERM, SIGKILL in turn. A second
    Ctrl-C meanwhile skips to SIGKILL."""
    try:
        for sig, wait in ((None, 2.0), (signal.SIGINT, grace), (signal.SIGTERM, grace)):
            if sig is not None and proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        pass
    proc.kill()
    proc.wait()


def watch(proc: subprocess.Popen, stage: str, output: Path, epochs: int | None, every: float = PROGRESS_EVERY,
          poll: float = POLL) -> int:
    """Wait for ``proc`` while printing progress read from ``output``; its exit status."""
    follower, start = OutputFollower(output), time.monotonic()
    progress, last_print = StageProgress(stage, epochs, start), start
    while True:
        try:
            status = proc.wait(timeout=poll)
        except subprocess.TimeoutExpired:
            status = None
        now = time.monotonic()
        for line in follower.new_lines():
            progress.feed(line, now)
        if status is not None:
            return status
        if now - last_print >= every:
            log.info("%s", progress.line(now))
            last_print = now


def run_watched(argv: list[str], stage: str, output: Path, every: float = PROGRESS_EVERY, **popen) -> int:
    """Run ``argv`` with its output to ``output`` and ``watch`` it; its exit status. Ctrl-C stops the subprocess
    before it goes on up."""
    proc = None
    epochs = flag_value(argv, "--epochs")
    try:
        with open(output, "w", encoding="utf-8") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)
            return watch(proc, stage, output, int(epochs) if epochs else None, every)
    except KeyboardInterrupt:
        if proc is not None:
            stop(proc)
        raise


@contextlib.contextmanager
def stage_named(stage: str, output: Path | None = None):
    """Ctrl-C inside the block becomes ``StageInterrupted`` naming the stage (and where its output went)."""
    try:
        yield
    except StageInterrupted:
        raise
    except KeyboardInterrupt:
        where = f"during stage {stage!r}" + (f" (its output: {output})" if output else "")
        raise StageInterrupted(where) from None
