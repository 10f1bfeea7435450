"""``python -m open_clip_po.ref_cache``: compute the frozen reference's features once over the training shards.

Takes the training command's own flags (``--model``, ``--pretrained`` or ``--po-ref-model/--po-ref-pretrained``,
``--train-data``, ``--po-reg-data``, ``--po-classnames``/``--po-template``, ``--aug-cfg``, ``--precision``,
``--batch-size``, ...) plus ``--out DIR``. One process, or ``torchrun`` (shards split across ranks). Each shard's
features are written atomically as soon as they are done, with the SHA-256 of the data shard they came from, and a
rerun skips the shards already written from the same data, so a killed build resumes; the manifest, with the
digests of every data shard and cache file, is written last, by rank 0, once every shard is there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip import get_input_dtype
from open_clip_train.params import parse_args as open_clip_parse_args
from open_clip_train.precision import get_autocast
from tqdm import tqdm

from ..atomic import DiskFullError, write_text
from ..checkpoint import atomic_save, dropped_head_warning
from ..data.classnames import read_classnames
from ..data.decode import decode_pair, decode_triplet
from ..data.errors import DataError
from ..data.patterns import expand_shards
from ..data.skips import SkipCounter
from ..data.tar import read_samples
from ..flags import po_argument_parser
from ..losses.distributed import world_info
from ..reference import freeze
from ..towers.text_span import configure_text_span
from .store import FORMAT, MANIFEST, PROMPTS_FILE, SHARDS_DIR, CacheError, _load, existing, run_signature
from .verify import file_digest


PROG = "python -m open_clip_po.ref_cache"


# The --po-* flags the cache reads; the training command's other --po-* flags are accepted and ignored.
PO_FLAGS_READ = ("--po-ref-model", "--po-ref-pretrained", "--po-reg-data", "--po-candidates", "--po-classnames",
                 "--po-template", "--po-full-text-context")


def own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                                usage=f"{PROG} --out DIR [the training command's flags]",
                                description="Compute the frozen reference's features once over the training shards. "
                                            "Give it the training command's own flags (--model, --pretrained or "
                                            "--po-ref-model/--po-ref-pretrained, --train-data, --po-reg-data, "
                                            "--aug-cfg, --precision, --batch-size, ...) plus --out. One process, "
                                            "or torchrun (shards split across ranks); a rerun resumes.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="cache folder (give it to training as --po-ref-cache DIR)")
    return p


def print_help() -> None:
    own_parser().print_help()
    formatter = argparse.HelpFormatter(PROG)
    formatter.start_section("the --po-* flags it reads (the training command's others are accepted and ignored)")
    formatter.add_arguments([a for a in po_argument_parser()._actions if set(a.option_strings) & set(PO_FLAGS_READ)])
    formatter.end_section()
    print("\n" + formatter.format_help(), end="")
    print("\nAll open_clip_train flags are accepted as well (python -m open_clip_train.main --help); the ones the "
          "cache\nreads are --model, --pretrained, --train-data, --aug-cfg, --precision, --batch-size, "
          "--force-image-size,\n--image-mean, --image-std, --image-interpolation and --force-context-length.")


def parse_args(argv):
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        raise SystemExit(0)
    ours, rest = own_parser().parse_known_args(argv)
    po, rest = po_argument_parser().parse_known_args(rest)
    args = open_clip_parse_args(rest)
    for key, value in {**vars(po), **vars(ours)}.items():
        setattr(args, key, value)
    if not args.train_data:
        raise SystemExit("open_clip_po.ref_cache: error: --train-data is required")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found now, not after the model is built
        raise SystemExit(f"open_clip_po.ref_cache: error: --out {out} is a file; give a folder (it is created)")
    return args


def _distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return world_info()


class Encoder:
    """The reference model in no-grad eval mode, under the run's autocast; float32, normalised features."""

    def __init__(self, model, precision, device):
        self.model, self.device = freeze(model), device  # as the online reference is, so both give the same features
        self.autocast = get_autocast(precision, device_type=device.type)

        self.input_dtype = get_input_dtype(precision)

    @torch.no_grad()
    def images(self, batch):
        with self.autocast():
            out = self.model.encode_image(batch.to(self.device, dtype=self.input_dtype), normalize=True)
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, tokens):
        with self.autocast():
            out = self.model.encode_text(tokens.to(self.device), normalize=True)
        return F.normalize(out.float(), dim=-1).cpu()


def shard_features(url, kind, encoder, preprocess, tokenize, batch_size) -> dict:
    counter = SkipCounter()
    decode = decode_triplet if kind == "pref" else decode_pair
    keys, images, captions, chunks = [], [], {}, []
    for sample in read_samples([url], counter):
        decoded = decode(sample, preprocess, tokenize, counter)
        if decoded is None:
            continue  # counted; training's reader skips the same sample
        keys.append(sample["__key__"])
        images.append(decoded[0])
        for tokens in decoded[1:]:
            captions.setdefault(tokens.numpy().tobytes(), tokens)
        if len(images) == batch_size:
            chunks.append(encoder.images(torch.stack(images)))
            images = []
    if images:
        chunks.append(encoder.images(torch.stack(images)))
    tokens = torch.stack(list(captions.values())) if captions else torch.zeros(0, 1, dtype=torch.long)
    text = torch.cat([encoder.texts(t) for t in tokens.split(batch_size)]) if captions else torch.zeros(0)
    skipped = counter.drain()
    if skipped:
        logging.info(f"{url}: skipped bad samples {skipped}")
    return {"keys": keys, "image": torch.cat(chunks) if chunks else torch.zeros(0), "tokens": tokens, "text": text}


def file_entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def reference_model(args, device):
    """The frozen reference as the training run builds it: ``(Encoder, model, preprocess_train, tokenizer)``."""
    name, pretrained = args.po_ref_model or args.model, args.po_ref_pretrained or args.pretrained
    warning = dropped_head_warning(pretrained, "--po-ref-pretrained" if args.po_ref_pretrained else "--pretrained")
    if warning:
        logging.warning(warning)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        name, pretrained, precision=args.precision, device=device, aug_cfg=args.aug_cfg,
        force_image_size=args.force_image_size, force_context_length=args.force_context_length,
        image_mean=args.image_mean, image_std=args.image_std, image_interpolation=args.image_interpolation,
        output_dict=True, cache_dir=args.cache_dir)
    configure_text_span(model, args.po_full_text_context, who="the reference")  # as the training run's reference
    tokenizer = open_clip.get_tokenizer(name, context_length=args.force_context_length)
    return Encoder(model, args.precision, device), model, preprocess_train, tokenizer


def _written_from(target: Path, source: dict) -> bool:
    """Whether ``target`` holds features an earlier, interrupted build computed from this very data shard."""
    if not target.is_file():
        return False
    try:
        return _load(target).get("source") == source
    except CacheError:
        logging.warning(f"{target} is unreadable: computing it again")
        return False


def build(args) -> Path:
    out = Path(args.out)
    rank, world = _distributed()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    encoder, model, preprocess_train, tokenizer = reference_model(args, device)
    shards = [(u, "pref") for u in existing(expand_shards(args.train_data)[0])]
    if args.po_reg_data:
        shards += [(u, "reg") for u in existing(expand_shards(args.po_reg_data, flag="--po-reg-data")[0])]
    mine = shards[rank::world]
    for url, kind in tqdm(mine, desc=f"reference features (rank {rank})", disable=rank != 0 and world > 1):
        target = out / SHARDS_DIR / f"{os.path.basename(url)}.pt"
        source = {"bytes": os.path.getsize(url), "sha256": file_digest(url)}
        if _written_from(target, source):
            continue
        features = shard_features(url, kind, encoder, preprocess_train, lambda t: tokenizer([t])[0], args.batch_size)
        atomic_save({**features, "source": source}, target, what="reference-cache file")
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        _finish(args, out, encoder, tokenizer, model, preprocess_train, shards)
    return out


def _finish(args, out, encoder, tokenizer, model, preprocess_train, shards) -> None:
    files, entries = {}, {}
    if args.po_classnames:

        tokens = tokenizer([args.po_template.format(n) for n in read_classnames(args.po_classnames)])
        atomic_save({"tokens": tokens, "text": encoder.texts(tokens)}, out / PROMPTS_FILE, what="reference-cache file")
        files[PROMPTS_FILE] = file_entry((out / PROMPTS_FILE).read_bytes())
    for url, kind in shards:  # each feature file read once: its digest, and the data shard's it records
        name = os.path.basename(url)
        data = (out / SHARDS_DIR / f"{name}.pt").read_bytes()
        files[f"{SHARDS_DIR}/{name}.pt"] = file_entry(data)
        entries[name] = {**_load(out / SHARDS_DIR / f"{name}.pt", data)["source"], "kind": kind}
    manifest = {"format": FORMAT, "signature": run_signature(args, preprocess_train),
                "logit_scale": float(model.logit_scale.exp().item()), "shards": entries, "files": files}
    write_text(out / MANIFEST, json.dumps(manifest, indent=1), what="reference-cache manifest")
    logging.info(f"reference cache written to {out} ({len(shards)} shard(s))")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        build(args)
    except (CacheError, DataError, DiskFullError) as e:  # a full disk: the shards written so far stay, a rerun resumes
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0
