"""What PO adds around open_clip's optimizer steps: the typed state ``open_clip_po.trainer.epoch`` calls into.

- weight averaging (BMA/EMA) after every good step, restored on resume;
- non-finite steps: counted in a row, ``--po-max-bad-steps`` of them stop the run with a checkpoint;
- a reference that follows the policy (TR-DPO) every ``--po-ref-sync-steps`` optimizer steps;
- bad samples: the ledger of skips, logged per epoch and for the run;
- RNG states of every rank captured at the end of each epoch and restored on resume, so a resumed run takes
  the same random draws (augmentation, loader seeds) as an unbroken one.
"""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from open_clip_train.distributed import is_master

from ..averaging import create_averager
from ..checkpoint import load_average
from ..losses.distributed import world_info
from ..data import SkipLedger


class TooManyBadSteps(RuntimeError):
    pass


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_for_checkpoint(state: dict) -> dict:
    """A form ``torch.load(weights_only=True)`` reads back: tensors, lists and numbers only."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    version, internal, gauss_next = state["python"]
    out = {"torch": state["torch"], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
           "python": [version, list(internal), gauss_next]}
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _rng_from_checkpoint(saved: dict) -> dict:
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    version, internal, gauss_next = saved["python"]
    out = {"torch": saved["torch"], "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
           "python": (version, tuple(internal), gauss_next)}
    if "cuda" in saved:
        out["cuda"] = saved["cuda"]
    return out


class TrainingHooks:
    def __init__(self, args, setup, save_checkpoint):
        self.args, self.setup, self._save = args, setup, save_checkpoint
        self.ledger = SkipLedger()
        self.averager = None
        self.bad_steps = 0
        self.rng_states: list | None = None    # every rank's, at the end of the last epoch (rank 0 saves them)
        self.resume = None                     # TrainingExtras of the checkpoint resumed from
        self.objective = None                  # the run's objective (its buffers are saved)
        self.ref_syncs = 0                     # TR-DPO syncs this epoch, logged at its end

    # --- epoch boundaries -------------------------------------------------------------------------------------
    def start_of_epoch(self, epoch: int, steps_per_epoch: int, is_master: bool) -> None:
        memo = getattr(self.setup.reference, "text_cache", None)
        if memo is not None:
            # A feature memoised from one batch differs in the last bit from the same caption encoded in another
            # batch; starting each epoch empty makes a run resumed at an epoch boundary repeat the unbroken one.
            memo.clear()
        if self.averager is None and self.args.po_average != "none" and is_master:
            self.averager = create_averager(self.args.po_average, self.setup.model, steps_per_epoch * self.args.epochs,
                                            self.args.po_bma_gamma, self.args.po_ema_decay)
            if self.resume is not None and self.resume.average is not None:
                load_average(self.averager, self.resume.average)
        if self.resume is not None:
            self._restore_resumed_rng()
            self.resume = None

    def _restore_resumed_rng(self) -> None:
        saved, rank = self.resume.rng, self.args.rank
        if not saved:
            logging.warning("the checkpoint has no RNG states: this resumed run will not repeat the unbroken one's "
                            "random draws exactly")
        elif len(saved) != self.args.world_size:
            logging.warning(f"the checkpoint holds RNG states of {len(saved)} ranks, this run has "
                            f"{self.args.world_size}: random draws will differ from the unbroken run")
        else:
            restore_rng(_rng_from_checkpoint(saved[rank]))

    def end_of_epoch(self, epoch: int) -> None:
        if self.args.po_ref_sync_steps and is_master(self.args):
            logging.info(f"TR-DPO: the reference moved towards the policy {self.ref_syncs} time(s) in epoch {epoch} "
                         f"(every {self.args.po_ref_sync_steps} optimizer steps, α = {self.args.po_ref_sync_alpha:g})")
        self.ref_syncs = 0
        self.ledger.log(epoch=epoch)  # sums over ranks: every rank must call it
        if epoch + 1 == self.args.epochs:
            self.ledger.log()  # the run's total
        state = _rng_for_checkpoint(capture_rng())
        world_size = world_info()[1]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, state)
            self.rng_states = gathered
        else:
            self.rng_states = [state]

    # --- steps ------------------------------------------------------------------------------------------------
    def good_step(self, step: int) -> None:
        """After optimizer step ``step`` (0-based, counted over the whole run)."""
        self.bad_steps = 0
        if self.averager is not None:
            self.averager.update(self.setup.model)
        every = self.args.po_ref_sync_steps
        if every and (step + 1) % every == 0:
            self.setup.reference.sync_from(self.setup.model, self.args.po_ref_sync_alpha)
            self.ref_syncs += 1

    def bad_step(self, model, optimizer, scaler, epoch: int, loss: torch.Tensor) -> None:
        self.bad_steps += 1
        limit = self.args.po_max_bad_steps
        logging.warning(f"non-finite PO loss ({loss.detach().item()}) at epoch {epoch}: step skipped "
                        f"({self.bad_steps}/{limit} in a row)")
        if self.bad_steps < limit:
            return
        path = os.path.join(self.args.checkpoint_path, f"bad_steps_epoch_{epoch}.pt")

        if is_master(self.args):
            ckpt = {"epoch": epoch, "name": self.args.name, "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict()}
            if scaler is not None:
                ckpt["scaler"] = scaler.state_dict()
            self._save(ckpt, path)
        raise TooManyBadSteps(f"{self.bad_steps} non-finite PO losses in a row at epoch {epoch}; "
                              f"last good weights saved to {path}")

    def objective_state(self) -> dict | None:
        """Buffers of a stateful objective (BCO's running baseline), saved so that a resume continues them."""
        return None if self.objective is None else {k: v.cpu() for k, v in self.objective.state_dict().items()}

    def reference_state(self) -> dict | None:
        """The reference's weights when they move (TR-DPO); a frozen reference is rebuilt from args instead."""
        return self.setup.reference.state_dict() if self.args.po_ref_sync_steps else None
