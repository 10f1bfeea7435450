"""One PO epoch, with open_clip's ``train_one_epoch`` signature so the seam can put it in its place.

It reuses open_clip's pieces (autocast and input dtype, ``backward``, ``AverageMeter``, the logit-scale clamp,
the step log's fields) and keeps only what PO changes:
- the "loss" argument is a ``POCriterion`` (policy + reference → L_pref + λ L_reg) that takes the whole batch;
- gradient accumulation is plain (PO losses are per-sample means, so no feature cache is needed): each
  micro-batch backpropagates loss / accum_freq, DDP syncs on the last one only;
- every rank ends the epoch at the same micro-batch: before each one the ranks agree that all of them have a
  batch (a rank whose shards held bad samples runs out first; without this the others would wait forever in
  the next collective); how many samples each rank really trained on is logged;
- a non-finite loss skips the step on every rank (they agree through one all-reduce) — ``hooks.bad_step``;
- in linear-head mode W's gradient is averaged across ranks by hand (no DDP there);
- ``hooks`` (``open_clip_po.trainer.hooks.TrainingHooks``) run at epoch start/end and after each good step;
- an epoch with no optimizer step is an error naming the data, not a run that "succeeds" untrained.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.distributed as dist
from open_clip import get_input_dtype
from open_clip_train.distributed import is_master
from open_clip_train.precision import get_autocast
from open_clip_train.train import AverageMeter, backward

from ..head import get_linear_head
from ..losses.distributed import world_info
from ..towers.unwrap import unwrap
from .amp import loss_scale, scaler_skipped_step

try:
    import wandb
except ImportError:  # open_clip treats wandb as optional too
    wandb = None


class NoTrainingSteps(RuntimeError):
    """An epoch ended without a single optimizer step."""


def _to_device(batch: dict, device, input_dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if not torch.is_tensor(value):
            out[key] = value
        elif key in ("images", "reg_images"):
            out[key] = value.to(device=device, dtype=input_dtype, non_blocking=True)
        else:
            out[key] = value.to(device=device, non_blocking=True)
    return out


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on any (one tiny all-reduce)."""
    if world_info()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _sync_head_grad(model, args) -> None:
    # Linear-head mode runs without DDP (only the head trains): average its gradients by hand.
    if args.distributed and getattr(args, "po_linear_head", False):
        for param in get_linear_head(model).parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(args.world_size)


def _optimizer_step(model, optimizer, scaler, args) -> None:
    _sync_head_grad(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        if args.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm, norm_type=2.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        if args.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm, norm_type=2.0)
        optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, math.log(100))  # as open_clip: ln(100)


def _forward_backward(model, criterion, batch, last_micro, autocast, scaler, args) -> tuple[dict, bool]:
    """One micro-batch: the criterion's output and whether its loss is finite on every rank (if not, no rank ran
    a backward). DDP syncs gradients on the last micro-batch of an accumulation group only."""
    sync = contextlib.nullcontext() if (last_micro or not hasattr(model, "no_sync")) else model.no_sync()
    with sync:
        with autocast():
            out = criterion(model, batch)
        finite = not _any_rank(not bool(torch.isfinite(out["loss"]).item()), torch.device(args.device))
        if finite:
            backward(out["loss"] / args.accum_freq, scaler)
    return out, finite


def _samples_per_rank(count: int, device) -> list[int]:
    rank, world_size = world_info()
    if world_size == 1:
        return [count]
    t = torch.zeros(world_size, dtype=torch.long, device=device)
    t[rank] = count
    dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None,
                    hooks=None):
    """``loss`` is a POCriterion; ``hooks`` a TrainingHooks, or None."""
    criterion = loss
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)

    model.train()
    if getattr(args, "po_linear_head", False):
        model.eval()  # frozen towers: keep dropout / batch-norm statistics as in the reference
    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    accum = args.accum_freq
    num_batches_per_epoch = dataloader.num_batches // accum
    if hooks is not None:
        hooks.start_of_epoch(epoch, num_batches_per_epoch, is_master(args))
    log = _StepLog(args, epoch, num_batches_per_epoch, dataloader.num_samples, tb_writer)

    optimizer.zero_grad()
    step_outputs, steps, samples, end = [], 0, 0, time.time()
    scaler_skipped = 0  # steps the fp16 GradScaler did not take: not counted as done (the weights did not move)
    group_samples = 0  # samples of the accumulation group under way; they count once its step is taken
    batches = iter(dataloader)
    for i in range(num_batches_per_epoch * accum):  # a ragged tail that cannot fill a step is left out
        batch = next(batches, None)
        if _any_rank(batch is None, device):
            break  # some rank has run out: all stop here, together
        i_accum = i // accum
        step = num_batches_per_epoch * epoch + i_accum
        if hooks is not None:
            hooks.ledger.add(batch.get("skipped", {}))
        if not args.skip_scheduler and scheduler is not None:
            scheduler(step)
        batch = _to_device(batch, device, input_dtype)
        log.data_time.update(time.time() - end)

        last_micro = (i + 1) % accum == 0
        out, finite = _forward_backward(model, criterion, batch, last_micro, autocast, scaler, args)
        if not finite:
            optimizer.zero_grad()
            step_outputs, group_samples = [], 0
            if hooks is not None:
                hooks.bad_step(model, optimizer, scaler, epoch, out["loss"])
            end = time.time()
            continue
        step_outputs.append(out)
        group_samples += batch["images"].shape[0]
        if not last_micro:
            continue

        scale_before = loss_scale(scaler)
        _optimizer_step(model, optimizer, scaler, args)
        steps += 1
        if scaler_skipped_step(scaler, scale_before):
            scaler_skipped += 1
        else:
            samples += group_samples
            if hooks is not None:
                hooks.good_step(step)
        group_samples = 0
        log.batch_time.update(time.time() - end)
        end = time.time()
        log.step(step_outputs, optimizer, step, i_accum + 1, batch["images"].shape[0])
        step_outputs = []

    optimizer.zero_grad()  # a partial accumulation group at an early end is dropped, not carried over
    _end_of_epoch(epoch, steps, scaler_skipped, samples, num_batches_per_epoch, device, args)
    if hooks is not None:
        hooks.end_of_epoch(epoch)
    return {name: m.avg for name, m in log.meters.items()}


def _end_of_epoch(epoch, steps, scaler_skipped, samples, planned_steps, device, args) -> None:
    """``steps`` optimizer steps were run, ``scaler_skipped`` of them not taken by the GradScaler; ``samples``
    counts those of the steps taken."""
    per_rank = _samples_per_rank(samples, device)
    if is_master(args):
        skipped = (f"; {scaler_skipped} step(s) not taken: the GradScaler found inf/NaN gradients (fp16 loss scale "
                   "calibrating, not bad data)") if scaler_skipped else ""
        logging.info(f"Train Epoch: {epoch} done: {steps - scaler_skipped}/{planned_steps} optimizer steps; samples "
                     f"trained on per rank: {per_rank}{skipped}")
    if steps == 0:
        raise NoTrainingSteps(
            f"epoch {epoch} made no optimizer step: --train-data {args.train_data} gave "
            f"{'no batch' if max(per_rank) == 0 else 'too few batches'} on at least one rank "
            f"(samples per rank: {per_rank}; see the bad-sample counts above)")


class _StepLog:
    """open_clip's step log (text log, tensorboard, wandb) with the same fields, and PO's losses and rewards."""

    def __init__(self, args, epoch, num_batches_per_epoch, samples_per_epoch, tb_writer):
        self.args, self.epoch, self.tb_writer = args, epoch, tb_writer
        self.num_batches_per_epoch, self.samples_per_epoch = num_batches_per_epoch, samples_per_epoch
        self.sample_digits = math.ceil(math.log(samples_per_epoch + 1, 10))
        self.meters, self.batch_time, self.data_time = {}, AverageMeter(), AverageMeter()

    def step(self, step_outputs, optimizer, step, batch_count, batch_size) -> None:
        args = self.args
        if not is_master(args) or not ((batch_count - 1) % args.log_every_n_steps == 0
                                       or batch_count == self.num_batches_per_epoch):
            return
        values = {key: sum(float(o[key].detach()) for o in step_outputs) / len(step_outputs)
                  for key in step_outputs[0]}
        logit_scale = values.pop("logit_scale")
        for key, value in values.items():
            self.meters.setdefault(key, AverageMeter()).update(value, batch_size)
        num_samples = batch_count * batch_size * args.accum_freq * args.world_size
        percent = 100.0 * batch_count / self.num_batches_per_epoch
        per_second = args.accum_freq * args.batch_size * args.world_size / max(self.batch_time.val, 1e-9)
        per_second_per_gpu = args.accum_freq * args.batch_size / max(self.batch_time.val, 1e-9)
        shown = " ".join(f"{k}: {m.val:#.5g} ({m.avg:#.5g})" for k, m in self.meters.items())
        lr = optimizer.param_groups[0]["lr"]
        logging.info(
            f"Train Epoch: {self.epoch} [{num_samples:>{self.sample_digits}}/{self.samples_per_epoch} "
            f"({percent:.0f}%)] Data (t): {self.data_time.avg:.3f} Batch (t): {self.batch_time.avg:.3f}, "
            f"{per_second:#g}/s, {per_second_per_gpu:#g}/s/gpu LR: {lr:5f} Logit Scale: {logit_scale:.3f} {shown}")
        log_data = {"data_time": self.data_time.val, "batch_time": self.batch_time.val,
                    "samples_per_second": per_second, "samples_per_second_per_gpu": per_second_per_gpu,
                    "scale": logit_scale, "lr": lr, **{k: m.val for k, m in self.meters.items()}}
        log_data = {"train/" + k: v for k, v in log_data.items()}
        if self.tb_writer is not None:
            for k, v in log_data.items():
                self.tb_writer.add_scalar(k, v, step)
        if args.wandb and wandb is not None:
            wandb.log({**log_data, "step": step}, step=step)
        self.batch_time.reset()  # per log window, as open_clip
        self.data_time.reset()
