"""How a run that must stop says why, in one line, and where that line is seen.

- ``one_line(error, args)``: the known ways a started run fails (a bad sample under ``--po-strict-data``, a full
  disk, too many bad steps, an epoch without a step, a reference cache that does not fit) as one line; None for
  anything else (a bug keeps its traceback).
- ``tell_launcher(message)``: under torchrun the last thing printed is torchrun's own ``ChildFailedError`` summary,
  after every rank's output. torchrun gives each rank a file to report its error in (``TORCHELASTIC_ERROR_FILE``)
  and prints that report as the summary's "Root Cause" — so the one line is written there, and the summary ends
  with it instead of "To enable traceback see: ...".
- ``missing_logger(args)``: ``--report-to tensorboard|wandb|all`` without the package, found before anything is
  built or created (open_clip asserts only after the model is built and the run folder made).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import open_clip_train.main as ocm

from ..atomic import DiskFullError, disk_full_error, is_disk_full, write_text
from ..checkpoint import CheckpointError, last_epoch_checkpoint
from ..data import BadSampleError
from ..ref_cache import CacheError
from .epoch import NoTrainingSteps
from .hooks import TooManyBadSteps

# --report-to name -> how to install what open_clip imports for it
LOGGER_PACKAGES = {"tensorboard": "pip install 'open-clip-po[tensorboard]'", "wandb": "pip install wandb"}


def worker_message(error: BaseException) -> str:
    """The original message of an exception a DataLoader worker raised: the main process re-raises it with the
    worker's whole traceback as its message, whose last line is ``module.Class: message``."""
    text = str(error)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = text.strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _resume_note(path: Path, args) -> str:
    """What a full disk while saving a checkpoint leaves to resume from."""
    folder = Path(getattr(args, "checkpoint_path", "") or "")
    if not folder.parts or path.parent.resolve() != folder.resolve():
        return ""
    latest = folder / "epoch_latest.pt"
    try:
        kept = latest if getattr(args, "save_most_recent", False) and latest.is_file() else \
            last_epoch_checkpoint(folder.parent)
    except CheckpointError:
        return "; no earlier checkpoint of this run: free space and run again with --resume latest"
    return f"; the last checkpoint, {kept}, is intact: free space and run again with --resume latest"


def one_line(error: BaseException, args) -> str | None:
    if isinstance(error, BadSampleError):
        return worker_message(error)
    if isinstance(error, (TooManyBadSteps, NoTrainingSteps, CacheError)):
        return str(error)
    if is_disk_full(error):
        if not isinstance(error, DiskFullError):  # a write outside our own (open_clip's params.txt, a log)
            where = Path(getattr(args, "logs", ".") or ".") / (getattr(args, "name", "") or "")
            filename = getattr(error, "filename", None)
            error = disk_full_error(error, filename or where, "file" if filename else "into the run folder",
                                    atomic=False)
        return str(error) + _resume_note(error.path, args)
    return None


def tell_launcher(message: str) -> None:
    """Write ``message`` as this rank's error report for torchrun (a no-op outside torchrun)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # torchrun shows the report with the smallest timestamp (whole seconds) as the root cause; ranks it stops
    # after this one get the second it noticed them, ties go to the lower rank. One second earlier keeps this
    # rank, the one that saw the cause, first.
    report = {"message": message, "timestamp": int(time.time()) - 1}
    try:
        write_text(path, json.dumps(report))
    except DiskFullError:
        pass  # nowhere to write it; stderr still has the line


def missing_logger(args) -> str | None:
    """One line if ``--report-to`` names a logger whose package is not installed."""
    wanted = {name.strip() for name in str(getattr(args, "report_to", "") or "").split(",") if name.strip()}
    if "all" in wanted:
        wanted |= set(LOGGER_PACKAGES)
    missing = [name for name in LOGGER_PACKAGES if name in wanted and getattr(ocm, name, None) is None]
    if not missing:
        return None
    return (f"--report-to {','.join(sorted(wanted))} needs {' and '.join(missing)}, not installed "
            f"({'; '.join(LOGGER_PACKAGES[name] for name in missing)}); nothing was started")
