"""Checkpoint format: open_clip's own, plus our keys outside ``state_dict``.

Written by ``open_clip_po.main`` (``logs/NAME/checkpoints/epoch_N.pt``, ``epoch_latest.pt``)::

    {
      "epoch": int, "name": str, "optimizer": ..., "scaler": ...,   # open_clip's keys
      "state_dict": {...},          # the stock open_clip model ("module." prefix under DDP), never the head
      "po_head": {"weight": W, "towers": "both" | "image"},   # only with --po-linear-head: W [D, D],
                                    # features f -> W f before normalising, on both towers or the image's
                                    # (a missing "towers" is "both")
      "po_head_note": str,          # with po_head: says that stock open_clip loads the towers without W
                 # + {"param": "log", "log": A} for a log-parameterised head (--po-head-param log, the
                 #   default): W = exp(A), W_t = exp(t A) exactly; "weight" is still W, for stock tools
                 #   and older readers. Without "log" the head is dense (W_t from W's SVD).
      "po_average": {               # only with --po-average bma|ema
          "kind": "bma" | "ema",
          "state_dict": {...},      # averaged stock model weights (no "module." prefix)
          "po_head": {"weight": W_avg, "towers": ...},   # only with a head
          "state": {...},           # the averager's counters, for resume
      },
      "po_reference": {...},        # only when the reference follows the policy (--po-ref-sync-steps)
      "po_rng": [{...}, ...],       # every rank's RNG states at the end of the epoch, for an exact resume
      "po_objective": {...},        # only for objectives with state (BCO's running reward baseline)
      "po_version": "0.1.0",
    }

``CheckpointCodec`` is the one place that moves these parts into and out of open_clip's dict; everything else
reads checkpoints through it or through ``model_weights``. Keeping the head out of ``state_dict`` means every checkpoint loads in stock
``open_clip.create_model_and_transforms(name, pretrained=path)`` (without the head);
``open_clip_po.svd_scale`` folds the head in when it should count. Stock open_clip cannot be made to warn that it
left the head out (it reads ``state_dict`` and ignores other keys), so the checkpoint says it in ``po_head_note``
and open_clip_po's own commands warn when they hand such a file to open_clip (``dropped_head_warning``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch

from . import __version__
from .atomic import atomic_path
from .head import HEAD_ATTR, attach_linear_head, check_param, check_towers, exp_head, generator_of

HEAD_KEY = HEAD_ATTR
HEAD_NOTE_KEY = "po_head_note"
HEAD_NOTE = ("po_head holds a linear head W that stock open_clip does not load (create_model(..., pretrained=this "
             "file) gives the towers without it); fold it in with: python -m open_clip_po.svd_scale THIS_FILE --t 1")
AVERAGE_KEY = "po_average"
REFERENCE_KEY = "po_reference"
RNG_KEY = "po_rng"
OBJECTIVE_KEY = "po_objective"
WEIGHT_CHOICES = ("raw", "bma", "ema")


EPOCH_CHECKPOINT = re.compile(r"epoch_(\d+)\.pt")   # open_clip's per-epoch names under RUN/checkpoints/


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def _describe(path: Path) -> str:
    """What a file that is not a checkpoint seems to be, for the error message."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return "a zip archive torch cannot read (a truncated checkpoint, or not one)"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return "an image"
    if head.lstrip().startswith((b"{", b"[")):
        return "a JSON/text file"
    if head.startswith(b"\x80"):
        return "a legacy (non-zip) pickle"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"a binary file of {path.stat().st_size} bytes"


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load with ``weights_only=True``; a bare state dict is wrapped as ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle with non-tensor objects, not a checkpoint at all, ...
        what = _describe(path)
        if what.startswith(("a zip", "a legacy")) and "Weights only load failed" in str(e):
            what = "a pickle holding objects other than tensors, refused by torch.load(weights_only=True)"
        elif what.startswith(("a zip", "a legacy", "a binary")):
            what += f" ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        raise CheckpointError(f"cannot read checkpoint {path}: {what}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" not in obj:
        if not obj or not all(torch.is_tensor(v) for v in obj.values()):
            raise CheckpointError(f"{path} is a dict without 'state_dict' and not a state dict of tensors "
                                  f"(keys: {', '.join(map(str, list(obj)[:5]))})")
        obj = {"state_dict": obj}
    return obj


def last_epoch_checkpoint(run_folder: str | os.PathLike) -> Path:
    """The last ``checkpoints/epoch_N.pt`` (largest N, compared as numbers) of an open_clip run folder."""
    folder = Path(run_folder) / "checkpoints"
    numbered = {int(m.group(1)): p for p in folder.glob("epoch_*.pt") if (m := EPOCH_CHECKPOINT.fullmatch(p.name))}
    if not numbered:
        raise CheckpointError(f"no epoch_N.pt checkpoint in {folder} (did training save one?)")
    return numbered[max(numbered)]


def strip_module_prefix(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def split_head(state_dict: dict) -> tuple[dict, dict | None]:
    """``(stock state dict, the head's own state or None)``: every ``po_head.*`` entry (under any "module."
    prefix) taken out, keyed by its name inside the head (``{"weight": W}`` or ``{"log": A}``)."""
    stock, head = {}, {}
    prefix = HEAD_ATTR + "."
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if name.startswith(prefix):
            head[name[len(prefix):]] = value
        else:
            stock[key] = value
    return stock, (head or None)


def join_head(state_dict: dict, head: dict | None, prefix: str = "") -> dict:
    """The inverse of :func:`split_head`: the head's state back under the model's parameter names."""
    joined = dict(state_dict)
    for name, value in (head or {}).items():
        joined[f"{prefix}{HEAD_ATTR}.{name}"] = value
    return joined


def peek_checkpoint(path: str | os.PathLike):
    """The top-level dict of a local checkpoint without reading its tensors (``mmap``); None if torch cannot
    read the file (``load_checkpoint`` then says what it is)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a file, not a zip checkpoint, truncated, ...
        return None


def dropped_head_warning(path, flag: str) -> str | None:
    """A warning when ``path`` (given as ``flag``) is a checkpoint with a linear head that open_clip, which builds
    the model from it, will leave out."""
    if not path or "://" in str(path) or not os.path.isfile(path):
        return None
    ckpt = peek_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get(HEAD_KEY) is None:
        return None
    return (f"{flag} {path} holds a linear head (po_head) that open_clip leaves out: the model starts from the "
            f"towers without W. To start from the head's model, fold it first: python -m open_clip_po.svd_scale "
            f"{path} --t 1")


def head_entry(weight: torch.Tensor | None, towers: str = "both", log: torch.Tensor | None = None) -> dict:
    """The ``po_head`` entry of a checkpoint: a dense W, or a log head's generator A together with W = exp(A)."""
    if log is None:
        return {"weight": weight, "towers": towers}
    generator = generator_of(log.detach(), towers)
    return {"weight": exp_head(generator).to(log.dtype), "towers": towers, "param": "log", "log": generator}


def entry_of_state(head: dict, towers: str) -> dict:
    """The ``po_head`` entry for a head's own state as :func:`split_head` gives it."""
    return head_entry(head.get("weight"), towers, head.get("log"))


def state_of_entry(entry: dict | None) -> dict | None:
    """The head's own state (parameter name → tensor) for a ``po_head`` entry; the inverse of entry_of_state."""
    if entry is None:
        return None
    return {"log": entry["log"]} if entry_param(entry) == "log" else {"weight": entry["weight"]}


def entry_param(entry: dict | None, path="checkpoint") -> str:
    """How a ``po_head`` entry parameterises W: "log" when it holds the generator, else "dense"."""
    try:
        param = check_param((entry or {}).get("param", "dense"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if param == "log" and not torch.is_tensor(entry.get("log")):
        raise CheckpointError(f"{path}: po_head says param 'log' but holds no generator ('log')")
    return param


def entry_towers(entry: dict | None, path="checkpoint") -> str:
    """Where a ``po_head`` entry's W acts; checkpoints written before heads had a choice hold "both"."""
    try:
        return check_towers("both" if entry is None else entry.get("towers", "both"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def average_entry(averager, state_dict: dict, towers: str = "both") -> dict:
    """The ``po_average`` entry: the live (un-prefixed) state dict with the averaged floats, head apart."""
    stock, head = split_head(averager.averaged_state_dict(strip_module_prefix(state_dict)))
    entry = {"kind": averager.kind, "state_dict": stock, "state": averager.state()}
    if head is not None:
        entry[HEAD_KEY] = entry_of_state(head, towers)
    return entry


def load_average(averager, entry: dict) -> None:
    """Restore ``averager`` from a ``po_average`` entry written by :func:`average_entry`."""
    averager.load(entry.get("kind"), join_head(entry["state_dict"], state_of_entry(entry.get(HEAD_KEY))),
                  entry["state"])


def model_weights(checkpoint: dict, weights: str = "raw", path: str = "checkpoint"):
    """``(state_dict, head_weight or None)`` for ``weights`` in raw|bma|ema, without "module." prefixes."""
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    source = checkpoint
    if weights != "raw":
        average = checkpoint.get(AVERAGE_KEY)
        if average is None:
            raise CheckpointError(f"{path} has no averaged weights (train with --po-average {weights})")
        if average.get("kind") != weights:
            raise CheckpointError(f"{path} holds {average.get('kind')} weights, not {weights}")
        source = average
    state_dict = strip_module_prefix(source["state_dict"])
    head = source.get(HEAD_KEY)
    return state_dict, (None if head is None else head["weight"])


def _head_source(checkpoint: dict, weights: str) -> dict:
    return (checkpoint.get(AVERAGE_KEY) or {}) if weights != "raw" else checkpoint


def head_towers(checkpoint: dict, weights: str = "raw", path="checkpoint") -> str:
    """Where the head of ``checkpoint`` (its raw or averaged weights) acts: "both" or "image"."""
    return entry_towers(_head_source(checkpoint, weights).get(HEAD_KEY), path)


def head_generator(checkpoint: dict, weights: str = "raw", path="checkpoint") -> torch.Tensor | None:
    """The generator A (W = exp(A)) of a log-parameterised head in ``checkpoint``; None for a dense head or none."""
    entry = _head_source(checkpoint, weights).get(HEAD_KEY)
    if entry is None or entry_param(entry, path) != "log":
        return None
    log, weight = entry["log"], entry.get("weight")
    if torch.is_tensor(weight) and log.shape != weight.shape:
        raise CheckpointError(f"{path}: po_head's generator is {tuple(log.shape)} but its W is {tuple(weight.shape)}")
    return log


@dataclass
class TrainingExtras:
    """What a training checkpoint carries besides open_clip's keys (all optional)."""
    average: dict | None = None          # a ``po_average`` entry
    reference: dict | None = None        # the reference's state dict when it follows the policy
    rng: list | None = field(default=None)  # per-rank RNG states
    objective: dict | None = None        # the objective's buffers


class CheckpointCodec:
    """Translates between open_clip's checkpoint dict (the model's state_dict with W inside, "module." under
    DDP) and ours (W and the extras outside ``state_dict``, so stock open_clip loads it)."""

    def __init__(self, *, linear_head: bool, head_towers: str = "both", head_param: str = "dense"):
        self.linear_head, self.head_towers, self.head_param = linear_head, head_towers, head_param

    def encode(self, ckpt: dict, *, averager=None, reference: dict | None = None, rng: list | None = None,
               objective: dict | None = None) -> dict:
        out = dict(ckpt)
        out["state_dict"], head = split_head(ckpt["state_dict"])
        if head is not None:
            out[HEAD_KEY] = entry_of_state(head, self.head_towers)
            out[HEAD_NOTE_KEY] = HEAD_NOTE
        if averager is not None:
            out[AVERAGE_KEY] = average_entry(averager, ckpt["state_dict"], self.head_towers)
        if reference is not None:
            out[REFERENCE_KEY] = reference
        if rng is not None:
            out[RNG_KEY] = rng
        if objective:
            out[OBJECTIVE_KEY] = objective
        out["po_version"] = __version__
        return out

    def decode(self, ckpt: dict, path, *, distributed: bool) -> tuple[dict, TrainingExtras]:
        """open_clip's view of a training checkpoint (W inside, "module." under DDP) and its extras."""
        prefix = "module." if distributed else ""
        head = ckpt.get(HEAD_KEY)
        if head is not None and not self.linear_head:
            raise CheckpointError(f"{path} has a linear head; resume it with --po-linear-head")
        if head is None and self.linear_head:
            raise CheckpointError(f"{path} has no linear head; it was not trained with --po-linear-head")
        towers = None if head is None else entry_towers(head, path)
        if towers is not None and towers != self.head_towers:
            raise CheckpointError(f"{path} has a head on {towers} tower(s); resume it with --po-head-towers {towers}")
        param = None if head is None else entry_param(head, path)
        if param is not None and param != self.head_param:
            raise CheckpointError(f"{path} has a {param} head; resume it with --po-head-param {param}")
        state_dict = {prefix + k: v for k, v in strip_module_prefix(ckpt["state_dict"]).items()}
        decoded = {k: v for k, v in ckpt.items() if k not in (HEAD_KEY, HEAD_NOTE_KEY, AVERAGE_KEY, REFERENCE_KEY,
                                                                RNG_KEY, OBJECTIVE_KEY)}
        decoded["state_dict"] = join_head(state_dict, state_of_entry(head), prefix)
        extras = TrainingExtras(ckpt.get(AVERAGE_KEY), ckpt.get(REFERENCE_KEY), ckpt.get(RNG_KEY),
                                ckpt.get(OBJECTIVE_KEY))
        return decoded, extras


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in nested dicts/lists/tuples, each storage once: about what ``torch.save`` writes."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            storage = item.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def atomic_save(obj, path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file. A full disk
    is ``atomic.DiskFullError`` (one line: ``what``, where, the size needed, the space free)."""
    with atomic_path(path, what, needed=tensor_bytes(obj)) as tmp:
        # A file object we close, not a path: a failed torch.save's writer lives on in the traceback and, on a full
        # disk, holds the deleted partial file's space. (The archive's inner name is then "archive/".)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return Path(path)


def create_model_from_checkpoint(model_name: str, path: str | os.PathLike, weights: str = "raw",
                                 device="cpu", **create_kwargs):
    """An open_clip model with the checkpoint's weights and, if it has one, its linear head attached.

    Returns ``(model, preprocess_train, preprocess_val)`` like ``open_clip.create_model_and_transforms``.
    """
    checkpoint = load_checkpoint(path)
    state_dict, head = model_weights(checkpoint, weights, str(path))
    towers = head_towers(checkpoint, weights, str(path))
    log = head_generator(checkpoint, weights, str(path))
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        model_name, device=device, **create_kwargs)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path} does not fit model {model_name}: {first}") from e
    if log is not None:
        attach_linear_head(model, towers=towers, log=log.to(device))
    elif head is not None:
        attach_linear_head(model, head.to(device), towers)
    return model, preprocess_train, preprocess_val
