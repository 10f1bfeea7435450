"""The command lines the demos run, all in one place: open_clip's trainer, the shard builders, ``torchrun -m
open_clip_po.main``, ``open_clip_po.svd_scale`` and ``open_clip_po.eval``. Each returns an argv list (evaluation
argv lists omit ``python -m open_clip_po.eval``, which ``Runner.eval`` runs in-process)."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..head import default_param
from .pipeline import TEMPLATE, DemoConfig, Method, StageError
from .world import FONT_DIR

# The trainer's settings every fine-tune shares: Adamax without weight decay (the paper's), a short warm-up,
# fp32 on CPU, one loader worker per rank.
FINETUNE_COMMON = ("--opt", "timm/adamax", "--wd", "0", "--warmup", "5", "--workers", "1", "--precision", "fp32",
                   "--log-every-n-steps", "10")


def shard_spec(folder: Path, prefix: str) -> str:
    """A brace pattern over ``folder/prefix-*.tar`` (as written by the builders; consecutive numbers)."""
    shards = sorted(p.name for p in folder.glob(f"{prefix}-*.tar"))
    if not shards:
        raise StageError(f"no {prefix}-*.tar shards in {folder}")
    first, last = shards[0][len(prefix) + 1:-4], shards[-1][len(prefix) + 1:-4]
    if first == last:
        return str(folder / shards[0])
    return str(folder / f"{prefix}-{{{first}..{last}}}.tar")


def pretrain_argv(cfg, name: str, epochs: int, shards: Path, logs: Path, start: Path | None) -> list[str]:
    """open_clip's own CLIP training on caption shards, run ``logs/pretrain-NAME``, launched as
    ``python -m open_clip_po.main`` with no ``--po-*`` flag: that is ``open_clip_train.main`` unchanged except that
    every shuffle of its WebDataset pipeline is seeded from ``--seed``, so two runs give the same model (open_clip
    alone seeds its sample shuffle from the clock). The sample count comes from the shards' ``sizes.json``, as
    open_clip reads it. ``cfg`` gives model, seed and the ``pretrain_*`` settings."""
    return [sys.executable, "-m", "open_clip_po.main",
            "--model", cfg.model, "--train-data", shard_spec(shards, shards.name), "--dataset-type", "webdataset",
            "--batch-size", str(cfg.pretrain_batch_size), "--epochs", str(epochs),
            "--lr", str(cfg.pretrain_lr), "--wd", "0.1", "--warmup", str(cfg.pretrain_warmup),
            "--workers", "1", "--precision", "fp32", "--seed", str(cfg.seed), "--log-every-n-steps", "20",
            "--save-frequency", str(epochs), "--logs", str(logs), "--name", f"pretrain-{name}"
            ] + ([] if start is None else ["--pretrained", str(start)])


def free_port() -> int:
    """A port free on this host now, for torchrun's rendezvous: demos running side by side must not meet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_argv(cfg, method: Method, pretrained: Path, data: list[str], logs: Path, run_name: str
                  ) -> list[str]:
    """``torchrun --nproc_per_node=N -m open_clip_po.main`` (gloo on CPU) on the ``data`` flags, with the method's
    objective and flags. ``cfg`` gives model, seed, the ``po_*`` settings and how a head is parameterised."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.po_procs}",
                "--master_port", str(free_port())]
    argv = launcher + [
        "-m", "open_clip_po.main", "--po-loss", method.loss, "--model", cfg.model, "--pretrained", str(pretrained),
        *data, "--batch-size", str(cfg.po_batch_size), "--epochs", str(cfg.po_epochs), "--seed", str(cfg.seed),
        *FINETUNE_COMMON, "--save-frequency", str(cfg.po_epochs), "--logs-dir", str(logs), "--name", run_name]
    if method.head:
        argv.append("--po-linear-head")
    argv += list(method.flags)
    if not method.head:
        return argv
    towers = method.flags[method.flags.index("--po-head-towers") + 1] if "--po-head-towers" in method.flags else "both"
    param = cfg.head_param or default_param(towers)
    wd = getattr(cfg, "head_wd", None) if param == "log" else None   # a demo's weight decay of its log heads
    return argv + ["--po-head-param", param] + (["--wd", wd] if wd else [])


# -- the typographic demo

# Whole-image crops: the training transform is deterministic, so the reference's features can be computed once
# (python -m open_clip_po.ref_cache) and the full fine-tunes run without a reference model, exactly.
EXACT_AUG = ("--aug-cfg", "scale=(1.0, 1.0)")


def ref_cache_argv(cfg, pretrained: Path, shards: Path, cache: Path) -> list[str]:
    """``python -m open_clip_po.ref_cache`` with the fine-tunes' own data flags and transform."""
    return [sys.executable, "-m", "open_clip_po.ref_cache", "--model", cfg.model, "--pretrained", str(pretrained),
            *typographic_data(shards), *EXACT_AUG, "--precision", "fp32", "--batch-size", str(cfg.po_batch_size),
            "--workers", "0", "--out", str(cache)]


def cached_reference(cache: Path) -> list[str]:
    """The flags of a fine-tune that reads the reference's features from ``cache``."""
    return [*EXACT_AUG, "--po-ref-cache", str(cache)]


def typographic_data(shards: Path) -> list[str]:
    """Typographic triplets and clean D_reg pairs, candidates = one prompt per class."""
    return ["--train-data", shard_spec(shards, "pref"), "--po-reg-data", shard_spec(shards, "reg"),
            "--po-candidates", "classes", "--po-classnames", str(shards / "classnames.txt"),
            "--po-template", TEMPLATE]


def typographic_argv(cfg: DemoConfig, out: Path) -> list[str]:
    """``python -m open_clip_po.data.typographic`` on the world's clean training images, plus an attacked copy of
    the test images (``--eval-out``)."""
    world = out / "world"
    font = FONT_DIR / "DejaVuSans-Bold.ttf"
    argv = [sys.executable, "-m", "open_clip_po.data.typographic", "--images", str(world / "train"),
            "--out", str(out / "shards"), "--image-size", str(cfg.image_size), "--template", TEMPLATE,
            "--per-image", str(cfg.po_attacks_per_image),
            "--font-size", *map(str, cfg.text_size_224), "--image-format", "png", "--seed", str(cfg.seed),
            "--eval-out", str(world / "test_attacked"), "--eval-images", str(world / "test"), "--quiet",
            # two shards per rank: every (rank, loader worker) reader needs its own shard
            "--max-count", str(-(-cfg.num_classes * cfg.train_per_class // (2 * cfg.po_procs)))]
    if font.is_file():
        argv += ["--fonts", str(font)]
    return argv


def zeroshot_argv(cfg: DemoConfig, ckpt: Path, test: Path, attacked: Path, output: Path) -> list[str]:
    return ["zeroshot", "--model", cfg.model, "--pretrained", str(ckpt), "--images", str(test),
            "--typographic", str(attacked), "--template", TEMPLATE, "--workers", "0", "--output", str(output)]


# -- the gender demo

def gender_shards_argv(csv_path: Path, out: Path, num_images: int, procs: int, seed: int) -> list[str]:
    """``python -m open_clip_po.data.gender`` as a user runs it: y_w = the flipped-gender caption, y_l = the
    original, D_reg = "The person is <activity>" (the builder's defaults)."""
    return [sys.executable, "-m", "open_clip_po.data.gender", "--csv", str(csv_path), "--out", str(out),
            "--image-format", "png", "--seed", str(seed), "--quiet",
            "--max-count", str(-(-num_images // (2 * procs)))]   # two shards per rank, as above


def gender_data(shards: Path) -> list[str]:
    """Gender triplets and neutral D_reg pairs; candidates = the batch's captions (open_clip_po.main's default)."""
    return ["--train-data", shard_spec(shards, "pref"), "--po-reg-data", shard_spec(shards, "reg")]


def svd_scale_argv(ckpt: Path, t: float, out: Path) -> list[str]:
    """``python -m open_clip_po.svd_scale``: W_t (exp(tA), or UΣ^tVᵀ) folded into a stock open_clip checkpoint,
    with the singular-value report."""
    return [sys.executable, "-m", "open_clip_po.svd_scale", str(ckpt), f"--t={t:g}", "--out", str(out), "--report"]


def gender_eval_argv(model: str, ckpt: Path, csv_path: Path, t_grid: str, top_k: int, output: Path) -> list[str]:
    return ["gender", "--model", model, "--pretrained", str(ckpt), "--csv", str(csv_path), f"--t={t_grid}",
            "--top-k", str(top_k), "--workers", "0", "--output", str(output)]
