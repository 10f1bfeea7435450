"""One PO epoch, with open_clip's ``train_one_epoch`` signature so the seam can put it in its place.

Follows open_clip's loop (scheduler per step, AMP + GradScaler, grad clipping, logit-scale clamp, logging to
the text log, tensorboard and wandb) with PO's differences:
- the "loss" argument is a ``POCriterion`` (policy + frozen reference → L_pref + λ L_reg);
- gradient accumulation is plain (PO losses are per-sample means, so no feature cache is needed): each
  micro-batch backpropagates loss / accum_freq, DDP syncs on the last one only;
- a non-finite loss skips the step on every rank (they agree through one all-reduce) with a warning;
  ``--po-max-bad-steps`` in a row stop the run with a checkpoint of the last good weights;
- weight averaging (BMA/EMA) is updated after every optimizer step; bad-sample counts are logged per epoch.
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
from open_clip_train.train import AverageMeter

from .amp import loss_scale, scaler_skipped_step
from .head import has_linear_head

try:
    import wandb
except ImportError:  # open_clip treats wandb as optional too
    wandb = None


class TooManyBadSteps(RuntimeError):
    pass


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
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _sync_head_grad(model, args) -> None:
    # Linear-head mode runs without DDP (only W trains): average W's gradient by hand.
    if args.distributed and has_linear_head(model) and getattr(args, "po_linear_head", False):
        grad = getattr(model, "module", model).po_head.weight.grad
        if grad is not None:
            dist.all_reduce(grad)
            grad.div_(args.world_size)


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


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None,
                    state=None):
    """``loss`` is a POCriterion; ``state`` (from the seam) carries the averager, skip ledger and bad-step hook."""
    criterion = loss
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    core = getattr(model, "module", model)

    model.train()
    if getattr(args, "po_linear_head", False):
        model.eval()  # frozen towers: keep dropout / batch-norm statistics as in the reference
    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    accum = args.accum_freq
    num_batches_per_epoch = dataloader.num_batches // accum
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))

    meters, batch_time_m, data_time_m = {}, AverageMeter(), AverageMeter()
    end = time.time()
    optimizer.zero_grad()
    step_outputs = []
    for i, batch in enumerate(dataloader):
        i_accum = i // accum
        step = num_batches_per_epoch * epoch + i_accum
        if i_accum >= num_batches_per_epoch:
            break  # a ragged tail of micro-batches that cannot fill an accumulation step
        if state is not None:
            state.ledger.add(batch.get("skipped", {}))
        if not args.skip_scheduler and scheduler is not None:
            scheduler(step)
        batch = _to_device(batch, device, input_dtype)
        data_time_m.update(time.time() - end)

        last_micro = (i + 1) % accum == 0
        sync = contextlib.nullcontext() if (last_micro or not hasattr(model, "no_sync")) else model.no_sync()
        with sync:
            with autocast():
                out = criterion(model, batch)
            finite = bool(torch.isfinite(out["loss"]).item())
            if _any_rank(not finite, device):
                optimizer.zero_grad()
                step_outputs = []
                if state is not None:
                    state.bad_step(model, optimizer, scaler, epoch, out)
                end = time.time()
                continue
            total = out["loss"] / accum
            if scaler is not None:
                scaler.scale(total).backward()
            else:
                total.backward()
        step_outputs.append(out)
        if not last_micro:
            continue

        scale_before = loss_scale(scaler)
        _optimizer_step(model, optimizer, scaler, args)
        optimizer.zero_grad()
        with torch.no_grad():
            core.logit_scale.clamp_(0, math.log(100))  # as open_clip: ln(100)
        if state is not None and not scaler_skipped_step(scaler, scale_before):
            state.good_step(model)

        batch_time_m.update(time.time() - end)
        end = time.time()
        batch_count = i_accum + 1
        if is_master(args) and (i_accum % args.log_every_n_steps == 0 or batch_count == num_batches_per_epoch):
            _log_step(step_outputs, meters, batch_time_m, data_time_m, optimizer, args, epoch, step, batch_count,
                      num_batches_per_epoch, dataloader.num_samples, sample_digits, batch["images"].shape[0],
                      tb_writer)
        step_outputs = []

    if state is not None:
        state.end_of_epoch(epoch)
    return {name: m.avg for name, m in meters.items()}


def _log_step(step_outputs, meters, batch_time_m, data_time_m, optimizer, args, epoch, step, batch_count,
              num_batches_per_epoch, samples_per_epoch, sample_digits, batch_size, tb_writer):
    values = {}
    for key in step_outputs[0]:
        values[key] = sum(float(o[key].detach()) for o in step_outputs) / len(step_outputs)
    logit_scale = values.pop("logit_scale")
    for key, value in values.items():
        meters.setdefault(key, AverageMeter()).update(value, batch_size)
    num_samples = batch_count * batch_size * args.accum_freq * args.world_size
    percent = 100.0 * batch_count / num_batches_per_epoch
    per_second = args.accum_freq * args.batch_size * args.world_size / max(batch_time_m.val, 1e-9)
    shown = " ".join(f"{k}: {m.val:#.5g} ({m.avg:#.5g})" for k, m in meters.items())
    logging.info(
        f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{samples_per_epoch} ({percent:.0f}%)] "
        f"Data (t): {data_time_m.avg:.3f} Batch (t): {batch_time_m.avg:.3f}, {per_second:#g}/s "
        f"LR: {optimizer.param_groups[0]['lr']:5f} Logit Scale: {logit_scale:.3f} {shown}")
    log_data = {"data_time": data_time_m.val, "batch_time": batch_time_m.val, "samples_per_second": per_second,
                "scale": logit_scale, "lr": optimizer.param_groups[0]["lr"]}
    log_data.update({k: m.val for k, m in meters.items()})
    log_data = {"train/" + k: v for k, v in log_data.items()}
    if tb_writer is not None:
        for k, v in log_data.items():
            tb_writer.add_scalar(k, v, step)
    if args.wandb and wandb is not None:
        wandb.log({**log_data, "step": step}, step=step)
    batch_time_m.reset()
    data_time_m.reset()
