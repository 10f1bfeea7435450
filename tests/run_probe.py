"""``torchrun tests/run_probe.py ARGS``: ``open_clip_po.main ARGS`` that also records, per rank, what each step saw.

The training batch carries no sample keys, so this probe writes ``$PO_PROBE_DIR/rank<R>.jsonl``: one line per
loss call with the epoch, the loss (exact, as float.hex) and, for PO batches, a fingerprint of every sample
(its preprocessed image and y_w tokens), and one line per checkpoint it writes. Plain CLIP runs record the
contrastive loss only. The first line holds the rank's place: node (GROUP_RANK) and local rank.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import open_clip.loss
import open_clip_train.main as ocm

from open_clip_po.trainer import seam as po_main
from open_clip_po.criterion import POCriterion

STATE = {"epoch": None}
OUT = os.path.join(os.environ["PO_PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl")


def _record(loss, samples=None):
    record = {"epoch": STATE["epoch"], "loss": float(loss.detach()).hex()}
    if samples is not None:
        record["samples"] = samples
    with open(OUT, "a") as f:
        f.write(json.dumps(record) + "\n")


def fingerprints(batch) -> list[str]:
    rows = zip(batch["images"].contiguous(), batch["chosen"].contiguous())
    return [hashlib.sha1(image.numpy().tobytes() + chosen.numpy().tobytes()).hexdigest()[:16]
            for image, chosen in rows]


def install():
    po_forward, clip_forward = POCriterion.forward, open_clip.loss.ClipLoss.forward

    def probed_po(self, model, batch):
        out = po_forward(self, model, batch)
        _record(out["loss"], fingerprints(batch))
        return out

    def probed_clip(self, *args, **kwargs):
        out = clip_forward(self, *args, **kwargs)
        _record(out["contrastive_loss"] if isinstance(out, dict) else out)
        return out

    POCriterion.forward = probed_po
    open_clip.loss.ClipLoss.forward = probed_clip
    session_epoch = po_main.POSession.train_one_epoch

    def po_epoch(self, model, data, loss, epoch, *rest, **kw):
        STATE["epoch"] = epoch
        return session_epoch(self, model, data, loss, epoch, *rest, **kw)

    po_main.POSession.train_one_epoch = po_epoch
    clip_epoch = ocm.train_one_epoch

    def plain_epoch(model, data, loss, epoch, *rest, **kw):
        STATE["epoch"] = epoch
        return clip_epoch(model, data, loss, epoch, *rest, **kw)

    ocm.train_one_epoch = plain_epoch
    session_save = po_main.POSession.save_checkpoint

    def recorded_save(self, obj, path, *a, **kw):
        with open(OUT, "a") as f:
            f.write(json.dumps({"saved": os.path.basename(path)}) + "\n")
        return session_save(self, obj, path, *a, **kw)

    po_main.POSession.save_checkpoint = recorded_save


if __name__ == "__main__":
    with open(OUT, "a") as f:
        f.write(json.dumps({"node": int(os.environ.get("GROUP_RANK", 0)),
                            "local_rank": int(os.environ.get("LOCAL_RANK", 0))}) + "\n")
    install()
    sys.exit(po_main.main(sys.argv[1:]))
