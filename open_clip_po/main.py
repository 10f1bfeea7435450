"""``torchrun -m open_clip_po.main --po-loss dpo [open_clip flags]``: open_clip's own trainer, with PO.

This is the one module that patches open_clip. Inside ``patched_open_clip_train()`` it replaces module
globals of ``open_clip_train.main`` — ``parse_args``, ``create_model_and_transforms``, ``get_data``,
``create_loss``, ``train_one_epoch``, ``evaluate``, ``pt_load`` and ``torch`` (a thin proxy whose ``save`` writes
our checkpoint keys atomically and whose DDP works on CPU) — and restores every one of them on exit, also on
errors. Everything else (logging, checkpoints, resume, precision, schedulers, locking, zero-shot eval,
tensorboard/wandb) is open_clip's code, untouched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import types

import torch

import open_clip_po  # noqa: F401  (registers po-tiny / po-small)

from . import losses as po_losses
from .averaging import averaged_checkpoint_entry, create_averager
from .checkpoint import AVERAGE_KEY, HEAD_KEY, atomic_save, load_checkpoint
from .criterion import POCriterion, POSettings
from .head import attach_linear_head, has_linear_head
from .options import check_open_clip_options, plain_clip_run
from .reference import Reference
from .seeding import SEEDED_DATA_GLOBALS, seeded_open_clip_data
from .train import TooManyBadSteps, train_one_epoch as po_train_one_epoch

PATCHED = ("parse_args", "create_model_and_transforms", "get_data", "create_loss", "train_one_epoch",
           "evaluate", "pt_load", "torch")
HPARAM_FLAGS = {"po_beta": "beta", "po_label_smoothing": "label_smoothing",
                "po_desirable_weight": "desirable_weight", "po_undesirable_weight": "undesirable_weight"}


class UsageError(SystemExit):
    """A bad flag or combination (or a run that must stop): one line on stderr, exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"open_clip_po.main: error: {message}")


def po_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("preference optimisation (open_clip_po)")
    g.add_argument("--po-loss", default=None, help="objective: " + ", ".join(po_losses.list_losses()))
    g.add_argument("--po-beta", type=float, default=None, help="β (objective's paper default if unset)")
    g.add_argument("--po-label-smoothing", type=float, default=None, help="cDPO / robust ε")
    g.add_argument("--po-desirable-weight", type=float, default=None, help="KTO λ_D")
    g.add_argument("--po-undesirable-weight", type=float, default=None, help="KTO λ_U")
    g.add_argument("--po-kto-kl", choices=("mismatched", "exact"), default="mismatched",
                   help="KTO reference point z: TRL's mismatched pairs, or the exact KL over the candidates")
    g.add_argument("--po-reg-data", default=None, help="clean image-text shards D_reg for the KL regulariser")
    g.add_argument("--po-reg-lambda", type=float, default=1.0, help="λ of Eq. 14")
    g.add_argument("--po-reg-kl", choices=("forward", "reverse"), default="forward",
                   help="forward = KL(π_θ‖π_ref) (the paper), reverse = KL(π_ref‖π_θ) (its released code)")
    g.add_argument("--po-reg-batch-size", type=int, default=None, help="b_reg per step (default: --batch-size)")
    g.add_argument("--po-reg-num-samples", type=int, default=None, help="size of D_reg if no sizes.json")
    g.add_argument("--po-strict-data", action="store_true", help="stop at the first bad sample")
    g.add_argument("--po-candidates", choices=("batch", "classes"), default="batch",
                   help="candidate captions of π(y|x): the global batch's, or one prompt per class")
    g.add_argument("--po-classnames", default=None, help="file with one class name per line")
    g.add_argument("--po-template", default="a photo of a {}.", help="class prompt template")
    g.add_argument("--ref-model", default=None, help="reference architecture (default: the policy's)")
    g.add_argument("--ref-pretrained", default=None, help="reference weights (default: the policy's start)")
    g.add_argument("--po-linear-head", action="store_true", help="train only a linear head W on frozen towers")
    g.add_argument("--po-average", choices=("none", "bma", "ema"), default="none")
    g.add_argument("--po-bma-gamma", type=float, default=0.7)
    g.add_argument("--po-ema-decay", type=float, default=0.999)
    g.add_argument("--po-eval-weights", choices=("raw", "average"), default="raw",
                   help="weights the epoch-end evaluation uses")
    g.add_argument("--po-eval-images", default=None, help="clean class-folder eval set (per-epoch O accuracy)")
    g.add_argument("--po-eval-typographic", default=None, help="attacked copy of it (per-epoch T accuracy)")
    g.add_argument("--po-max-bad-steps", type=int, default=10, help="non-finite losses in a row before stopping")
    g.add_argument("--logs-dir", default=None, help="alias of open_clip's --logs (torchrun swallows --logs)")
    return p


def parse_po_args(argv, open_clip_parse_args):
    ours, rest = po_argument_parser().parse_known_args(argv)
    if ours.logs_dir is not None:
        rest = [*rest, "--logs", ours.logs_dir]
    args = open_clip_parse_args(rest)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    if "timm" in args.opt and args.eps is None:
        args.eps = 1e-8  # open_clip hands timm eps=None, which torch's Adam-family optimizers reject
    validate(args)
    return args


def validate(args) -> None:
    if plain_clip_run(args, po_argument_parser()):
        return
    if args.po_loss is None:
        raise UsageError("--po-loss is required (one of: " + ", ".join(po_losses.list_losses()) + ")")
    if args.po_loss not in po_losses.list_losses():
        raise UsageError(f"unknown --po-loss {args.po_loss!r}; known: " + ", ".join(po_losses.list_losses()))
    if not args.train_data:
        raise UsageError("--train-data (triplet shards, see README 'Data') is required")
    if args.po_candidates == "classes" and not args.po_classnames:
        raise UsageError("--po-candidates classes needs --po-classnames FILE")
    if args.po_linear_head and (args.ref_model or args.ref_pretrained):
        raise UsageError("--po-linear-head uses the frozen backbone itself as reference; drop --ref-model/--ref-pretrained")
    if args.po_reg_lambda < 0:
        raise UsageError(f"--po-reg-lambda must be >= 0, got {args.po_reg_lambda}")
    if args.po_beta is not None and args.po_beta <= 0:
        raise UsageError(f"--po-beta must be > 0, got {args.po_beta}")
    if args.po_max_bad_steps < 1:
        raise UsageError("--po-max-bad-steps must be >= 1")
    if args.po_eval_typographic and not args.po_eval_images:
        raise UsageError("--po-eval-typographic needs --po-eval-images (the clean set and its class names)")
    for flag in ("po_eval_images", "po_eval_typographic", "po_classnames"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):  # found now, not after the first epoch
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.po_eval_weights == "average" and args.po_average == "none":
        raise UsageError("--po-eval-weights average needs --po-average bma|ema")
    try:
        check_open_clip_options(args)
        build_objective(args)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--po-loss {args.po_loss}: {e}".splitlines()[0]) from e


def build_objective(args):
    hparams = {name: getattr(args, flag) for flag, name in HPARAM_FLAGS.items() if getattr(args, flag) is not None}
    return po_losses.get_loss(args.po_loss, **hparams)


class LocalReplica(torch.nn.Module):
    """Stands where DDP would in linear-head mode: only W trains, its gradient is all-reduced by hand."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _Proxy(types.ModuleType):
    """A module that is ``target`` except for a few attributes."""

    def __init__(self, target, **overrides):
        super().__init__(target.__name__)
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._target, name)


class POSession:
    """State shared by the patched functions during one ``main`` call."""

    def __init__(self, originals: dict):
        self.orig = originals
        self.args = None
        self.reference = None
        self.preprocess_val = None
        self.tokenizer = None
        self.averager = None
        self.resume_average = None
        self.model = None
        self.bad_steps = 0
        from .data import SkipLedger  # the data package pulls in webdataset; only the trainer needs it

        self.ledger = SkipLedger()

    # --- parse / model / data / loss ---------------------------------------------------------------------------
    def parse_args(self, argv):
        self.args = parse_po_args(argv, self.orig["parse_args"])
        return self.args

    def create_model_and_transforms(self, *a, **kw):
        # open_clip's setup_logging (just run) set every logger to INFO; torch's then print compile
        # statistics at exit even when nothing was compiled
        for name in logging.root.manager.loggerDict:
            if name.startswith(("torch._dynamo", "torch._subclasses", "torch._inductor")):
                logging.getLogger(name).setLevel(logging.WARNING)
        model, preprocess_train, preprocess_val = self.orig["create_model_and_transforms"](*a, **kw)
        if self.model is not None:
            return model, preprocess_train, preprocess_val
        args = self.args
        self.model, self.preprocess_val = model, preprocess_val
        if args.po_linear_head:
            model.requires_grad_(False)
            attach_linear_head(model).requires_grad_(True)
            self.reference = Reference(None, is_base_of_head=True)
        elif args.ref_model or args.ref_pretrained:
            ref, _, _ = self.orig["create_model_and_transforms"](
                args.ref_model or args.model, args.ref_pretrained, precision=args.precision,
                device=kw.get("device"), output_dict=True, cache_dir=args.cache_dir)
            self.reference = Reference(ref)
        else:
            # Taken now: before resume, locking, the head and DDP touch the policy.
            shares_text = bool(args.lock_text and args.lock_text_unlocked_layers == 0
                               and args.lock_text_freeze_layer_norm)
            self.reference = Reference.copy_of(model, shares_text=shares_text)
        return model, preprocess_train, preprocess_val

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        from .data import get_po_data

        self.tokenizer = tokenizer
        train_data = args.train_data
        args.train_data = None  # open_clip builds only the eval sets; the triplet stream is ours
        try:
            data = self.orig["get_data"](args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        finally:
            args.train_data = train_data
        data.update(get_po_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer))
        return data

    def create_loss(self, args):
        prompts = None
        if args.po_candidates == "classes":
            names = read_classnames(args.po_classnames)
            prompts = self.tokenizer([args.po_template.format(n) for n in names])
        settings = POSettings(reg_lambda=args.po_reg_lambda, reg_direction=args.po_reg_kl,
                              candidates=args.po_candidates, kto_kl=args.po_kto_kl,
                              distributed=bool(args.distributed))
        return POCriterion(build_objective(args), self.reference, settings, prompt_tokens=prompts)

    # --- training ----------------------------------------------------------------------------------------------
    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None):
        from open_clip_train.distributed import is_master

        self._optimizer, self._scaler = optimizer, scaler
        if self.averager is None and args.po_average != "none" and is_master(args):
            steps = (data["train"].dataloader.num_batches // args.accum_freq) * args.epochs
            self.averager = create_averager(args.po_average, self.model, steps, args.po_bma_gamma,
                                            args.po_ema_decay)
            if self.resume_average is not None:
                self.averager.load(self.resume_average)
        po_train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                           tb_writer=tb_writer, state=self)
        if args.po_eval_images and not any(k in data for k in ("val", "imagenet-val", "imagenet-v2")):
            self.evaluate_po(model, epoch + 1, args, tb_writer)  # open_clip calls evaluate only with val sets

    def good_step(self, model):
        self.bad_steps = 0
        if self.averager is not None:
            self.averager.update(self.model)

    def bad_step(self, model, optimizer, scaler, epoch, out):
        self.bad_steps += 1
        logging.warning(f"non-finite PO loss ({out['loss'].detach().item()}) at epoch {epoch}: step skipped "
                        f"({self.bad_steps}/{self.args.po_max_bad_steps} in a row)")
        if self.bad_steps < self.args.po_max_bad_steps:
            return
        path = os.path.join(self.args.checkpoint_path, f"bad_steps_epoch_{epoch}.pt")
        from open_clip_train.distributed import is_master

        if is_master(self.args):
            ckpt = {"epoch": epoch, "name": self.args.name, "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict()}
            if scaler is not None:
                ckpt["scaler"] = scaler.state_dict()
            self.save_checkpoint(ckpt, path)
        raise TooManyBadSteps(f"{self.bad_steps} non-finite PO losses in a row at epoch {epoch}; "
                              f"last good weights saved to {path}")

    def end_of_epoch(self, epoch):
        self.ledger.log(epoch=epoch)  # sums over ranks: every rank must call it
        if epoch + 1 == self.args.epochs:
            self.ledger.log()  # the run's total

    # --- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self, model, data, epoch, args, tb_writer=None, tokenizer=None):
        with self.eval_weights():
            metrics = self.orig["evaluate"](model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)
        if args.po_eval_images:
            metrics = {**(metrics or {}), **self.evaluate_po(model, epoch, args, tb_writer)}
        return metrics

    @contextlib.contextmanager
    def eval_weights(self):
        if self.args.po_eval_weights != "average" or self.averager is None:
            yield
            return
        params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.averager.copy_to(self.model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(params[n])

    def evaluate_po(self, model, epoch, args, tb_writer=None) -> dict:
        from open_clip_train.distributed import is_master

        if not is_master(args):
            return {}
        from .eval.zeroshot import typographic_eval

        with self.eval_weights():
            self.model.eval()
            result = typographic_eval(self.model, self.tokenizer, self.preprocess_val, args.po_eval_images,
                                      args.po_eval_typographic, templates=[args.po_template],
                                      device=args.device, batch_size=args.batch_size)
        metrics = {f"po/{k}": v for k, v in result.items()}
        logging.info(f"Eval Epoch: {epoch} " + " ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        if args.save_logs:
            with open(os.path.join(args.logs, args.name, "po_eval.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
            if tb_writer is not None:
                for k, v in metrics.items():
                    tb_writer.add_scalar(f"val/{k}", v, epoch)
        if getattr(args, "wandb", False):
            import wandb

            wandb.log({f"val/{k}": v for k, v in metrics.items()} | {"epoch": epoch})
        return metrics

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, obj, path, *a, **kw):
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = dict(obj)
            state_dict = dict(obj["state_dict"])
            head_keys = [k for k in state_dict if k.split(".")[-2:] == [HEAD_KEY, "weight"]]
            for k in head_keys:
                obj[HEAD_KEY] = {"weight": state_dict.pop(k)}
            obj["state_dict"] = state_dict
            if self.averager is not None:
                plain = {k.removeprefix("module."): v for k, v in state_dict.items()}
                plain.update({"po_head.weight": obj[HEAD_KEY]["weight"]} if HEAD_KEY in obj else {})
                obj[AVERAGE_KEY] = averaged_checkpoint_entry(self.averager, plain)
            obj["po_version"] = open_clip_po.__version__
        return atomic_save(obj, path)

    def pt_load(self, path, map_location=None):
        remote = "://" in str(path)
        ckpt = self.orig["pt_load"](path, map_location=map_location) if remote else load_checkpoint(path)
        if "epoch" not in ckpt:
            return ckpt
        args = self.args
        prefix = "module." if args.distributed else ""
        state_dict = {prefix + k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        head = ckpt.get(HEAD_KEY)
        if head is not None and not args.po_linear_head:
            raise UsageError(f"{path} has a linear head; resume it with --po-linear-head")
        if head is None and args.po_linear_head:
            raise UsageError(f"{path} has no linear head; it was not trained with --po-linear-head")
        if head is not None:
            state_dict[prefix + "po_head.weight"] = head["weight"]
        ckpt["state_dict"] = state_dict
        self.resume_average = ckpt.get(AVERAGE_KEY)
        if self.resume_average is None and args.po_average != "none":
            logging.warning(f"{path} has no averaged weights; averaging restarts from the resumed weights")
        return ckpt

    def ddp(self, module, device_ids=None, **kwargs):
        if module is self.model and has_linear_head(module) and self.args.po_linear_head:
            return LocalReplica(module)
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None  # open_clip passes device_ids=[cpu]; DDP only accepts that for GPU modules
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)

    def torch_proxy(self):
        parallel = _Proxy(torch.nn.parallel, DistributedDataParallel=self.ddp)
        return _Proxy(torch, save=self.save_checkpoint, nn=_Proxy(torch.nn, parallel=parallel))


def read_classnames(path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UsageError(f"cannot read --po-classnames {path}: {e.strerror}") from e
    if not names:
        raise UsageError(f"--po-classnames {path} lists no class")
    return names


@contextlib.contextmanager
def patched_open_clip_train(plain: bool = False):
    """Patch ``open_clip_train.main`` (and ``.data``) for one run; every original is back on exit."""
    import open_clip_train.data as ocd
    import open_clip_train.main as ocm

    originals = {name: getattr(ocm, name) for name in PATCHED}
    data_originals = {name: getattr(ocd, name) for name in SEEDED_DATA_GLOBALS}
    session = POSession(originals)
    replacements = {
        "parse_args": session.parse_args,
        "create_model_and_transforms": session.create_model_and_transforms,
        "get_data": session.get_data,
        "create_loss": session.create_loss,
        "train_one_epoch": session.train_one_epoch,
        "evaluate": session.evaluate,
        "pt_load": session.pt_load,
        "torch": session.torch_proxy(),
    }
    if plain:  # open_clip's CLIP training: only the flags, CPU DDP, atomic saves and seeded shuffles
        replacements = {name: replacements[name] for name in ("parse_args", "torch")}
    try:
        for name, value in replacements.items():
            setattr(ocm, name, value)
        for name, value in seeded_open_clip_data(lambda: session.args).items():
            setattr(ocd, name, value)
        yield session
    finally:
        for name, value in originals.items():
            setattr(ocm, name, value)
        for name, value in data_originals.items():
            setattr(ocd, name, value)


def main(argv=None) -> int:
    import open_clip_train.main as ocm

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        po_argument_parser().print_help()
        print("\nAll open_clip_train flags are accepted as well (python -m open_clip_train.main --help).")
        return 0
    plain = plain_clip_run(po_argument_parser().parse_known_args(argv)[0], po_argument_parser())
    with patched_open_clip_train(plain=plain):
        try:
            status = ocm.main(argv)
        except TooManyBadSteps as e:
            raise UsageError(str(e)) from e
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
