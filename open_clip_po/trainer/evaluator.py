"""PO's epoch-end evaluation: open_clip's own ``evaluate`` plus clean/typographic zero-shot accuracy on
``--po-eval-images`` (and ``--po-eval-typographic``), with the raw or the averaged weights."""
from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from open_clip_train.distributed import is_master

from ..eval.zeroshot import typographic_eval


class Evaluator:
    def __init__(self, args, setup, hooks, open_clip_evaluate):
        self.args, self.setup, self.hooks, self._evaluate = args, setup, hooks, open_clip_evaluate
        self.tokenizer = None

    def evaluate(self, model, data, epoch, args, tb_writer=None, tokenizer=None):
        with self.eval_weights():
            metrics = self._evaluate(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)
        if args.po_eval_images:
            metrics = {**(metrics or {}), **self.evaluate_po(epoch, tb_writer)}
        return metrics

    @contextlib.contextmanager
    def eval_weights(self):
        """Swap the averaged weights in for the block, when ``--po-eval-weights average`` asks for them."""
        averager, model = self.hooks.averager, self.setup.model
        if self.args.po_eval_weights != "average" or averager is None:
            yield
            return
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        averager.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(params[n])

    def evaluate_po(self, epoch, tb_writer=None) -> dict:
        args = self.args
        if not is_master(args):
            return {}

        model = self.setup.model
        with self.eval_weights():
            was_training = model.training
            model.eval()
            result = typographic_eval(model, self.tokenizer, self.setup.preprocess_val, args.po_eval_images,
                                      args.po_eval_typographic, templates=[args.po_template],
                                      device=args.device, batch_size=args.batch_size)
            model.train(was_training)
        metrics = {f"po/{k}": v for k, v in result.items()}
        logging.info(f"Eval Epoch: {epoch} " + " ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        self._record(epoch, metrics, tb_writer)
        return metrics

    def _record(self, epoch, metrics, tb_writer) -> None:
        args = self.args
        if args.save_logs:
            with open(os.path.join(args.logs, args.name, "po_eval.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
            if tb_writer is not None:
                for k, v in metrics.items():
                    tb_writer.add_scalar(f"val/{k}", v, epoch)
        if getattr(args, "wandb", False):
            import wandb

            wandb.log({f"val/{k}": v for k, v in metrics.items()} | {"epoch": epoch})
