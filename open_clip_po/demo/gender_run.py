"""``run_gender_demo(cfg, out)``: the gender demo's stages, in order; returns the report dict.

world (people doing activities, gender-skewed captions) → pre-training with open_clip's trainer →
``python -m open_clip_po.data.gender`` on the training CSV → linear heads (on the image tower per objective, and
the paper's on both towers) through
``torchrun -m open_clip_po.main --po-linear-head`` → ``python -m open_clip_po.eval gender`` over t →
``python -m open_clip_po.svd_scale`` at t = 1 and the neutral t* → ``report.md`` / ``report.json`` / plots.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from .commands import finetune_argv, gender_data, gender_eval_argv, gender_shards_argv, pretrain_argv, svd_scale_argv
from .gender_report import at_t, write_gender_report
from .people import balanced_labels, skewed_labels
from .people_files import CSV_NAME, people_grid, write_people_folder, write_people_shards
from .pipeline import Method, Runner, StageError, checkpoint_of, fresh

log = logging.getLogger("open_clip_po.demo")


def gender_methods(losses=("dpo", "ipo", "kto"), paper_losses=("dpo",), image_lr: str = "1e-2",
                   paper_lr: str = "5e-2") -> tuple[Method, ...]:
    """Linear heads at the paper's β = λ = 1 for gender (what ``scripts/slurm/gender.sh`` sets): one on the image
    tower per objective of ``losses`` (``--po-head-towers image``, which can reverse gender), and the paper's head
    on both towers for ``paper_losses`` — on this world it erases gender rather than reversing it, since its
    similarity xᵀWᵀWy cannot reverse a direction that pre-training made near-parallel in the two towers."""
    common = ("--po-beta", "1", "--po-reg-lambda", "1")
    # The image head keeps its straight line I + t(W − I); a tenth of λ on the KL of the head turned around, 2I − W,
    # kept activity at 99 % down to t = −2 (KTO: 0 % without it) and the flip at 99 % (μ = λ halved DPO's flip)
    image = tuple(Method(loss.upper() + " + image head", loss, True,
                         ("--po-head-towers", "image", *common, "--lr", image_lr, "--po-head-reverse-lambda", "0.1"))
                  for loss in losses)
    paper = tuple(Method(loss.upper() + " + paper head", loss, True, (*common, "--lr", paper_lr))
                  for loss in paper_losses)
    return image + paper


@dataclasses.dataclass(frozen=True)
class GenderConfig:
    model: str = "po-small"
    image_size: int = 64
    pretrain_images: int = 6000          # gender-skewed, captioned
    # share of pre-training captions "The person is <activity>"; none by default, so the neutral captions' gender
    # lean is the text tower's (where "person" lands between "man" and "woman"), the kind a flip learned from the
    # gendered captions cancels; pre-trained on images, their lean is the image tower's and the flip misses it
    neutral_share: float = 0.0
    # share of pre-training images whose activity object is out of frame: there gender is the only hint of the
    # activity, so pre-training ties the captions' activities to gender as web data does (and, here, the neutral
    # captions' lean grows from at most 2 pooled sd to 4-8)
    hidden_share: float = 0.3
    pretrain_epochs: int = 3
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 50
    train_per_cell: int = 50             # per (gender, activity): 600 PO training images
    test_per_cell: int = 60              # 720 held-out images: standard error of a rate ≤ 1.9 points
    po_epochs: int = 10                  # DPO's margin levels off by then
    po_batch_size: int = 32
    po_procs: int = 2
    methods: tuple[Method, ...] = gender_methods()
    t_grid: str = "-2:2:0.25"
    top_k: int = 30                      # retrieved images per activity prompt (of 2 × test_per_cell)
    head_param: str | None = None        # --po-head-param of every head (None: the trainer's default per towers)
    seed: int = 0
    quick: bool = False                  # a pipeline check: its own targets, not the claim


def full_gender_config() -> GenderConfig:
    return GenderConfig()


def quick_gender_config() -> GenderConfig:
    """For CI: a smaller world, shorter pre-training, DPO's image head only, a coarse t grid."""
    return dataclasses.replace(GenderConfig(), pretrain_images=3000, train_per_cell=25, test_per_cell=25,
                               po_epochs=5, methods=gender_methods(("dpo",), ()), t_grid="-1:1:0.5", top_k=15, quick=True)


def build_people_world(cfg: GenderConfig, out: Path, quiet: bool, pretraining: bool = True) -> dict:
    world = fresh(out / "world")
    world.mkdir(parents=True)
    counts = {}
    if pretraining:
        labels = skewed_labels(cfg.pretrain_images, np.random.default_rng([cfg.seed, 1]))
        counts["pretrain"] = write_people_shards(world / "pretrain", labels, cfg.neutral_share, cfg.seed,
                                                 cfg.image_size, quiet, hidden_share=cfg.hidden_share)
    for name, per_cell, seed in (("train", cfg.train_per_cell, cfg.seed + 1), ("test", cfg.test_per_cell,
                                                                                cfg.seed + 2)):
        labels = balanced_labels(per_cell)
        write_people_folder(world / name, labels, seed, cfg.image_size, quiet)
        counts[name] = len(labels)
    return counts


def run_gender_demo(cfg: GenderConfig, out: Path, *, pretrained: Path | None = None, quiet: bool = False,
                    threads: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.txt").write_text("", encoding="utf-8")
    runner = Runner(out, threads)
    t_start = time.perf_counter()
    runs, world = out / "runs", out / "world"

    if cfg.quick:
        log.info("--quick: a pipeline check (smaller world, shorter training, one head); its report checks its own "
                 "targets and shows the full demo's claim separately (not expected of --quick)")
    log.info("1/5 world: people doing activities, %d pre-training images", cfg.pretrain_images)
    counts = runner.timed("world", build_people_world, cfg, out, quiet, pretrained is None)
    people_grid(world / "test" / CSV_NAME, out / "world_examples.png", cfg.image_size)

    if pretrained is None:
        log.info("2/5 pre-training %s with open_clip's trainer (%d epochs)", cfg.model, cfg.pretrain_epochs)
        fresh(runs / "pretrain-people")
        runner.run("pretrain", pretrain_argv(cfg, "people", cfg.pretrain_epochs, world / "pretrain", runs, None))
        pretrained = checkpoint_of(runs, "pretrain-people")

    log.info("3/5 gender triplets from the training CSV")
    shards = fresh(out / "shards")
    runner.run("shards", gender_shards_argv(world / "train" / CSV_NAME, shards, counts["train"], cfg.po_procs,
                                            cfg.seed))

    log.info("4/5 linear heads: %s", ", ".join(m.name for m in cfg.methods))
    evals = fresh(out / "eval")
    evals.mkdir()
    rows = []
    for method in cfg.methods:
        name = method.slug
        fresh(runs / name)
        try:
            runner.run(f"finetune-{name}", finetune_argv(cfg, method, pretrained, gender_data(shards), runs, name))
        except StageError as e:
            log.error("%s", e)
            rows.append({"method": method.name, "loss": method.loss, "error": str(e)})
            continue
        ckpt = checkpoint_of(runs, name)
        runner.eval(f"eval-{name}", gender_eval_argv(cfg.model, ckpt, world / "test" / CSV_NAME, cfg.t_grid,
                                                     cfg.top_k, evals / f"{name}.json"))
        result = json.loads((evals / f"{name}.json").read_text(encoding="utf-8"))
        t_star = result["metrics"]["t_star"]   # null in the JSON when own and flipped never cross on the grid
        rows.append({"method": method.name, "loss": method.loss, "run": name, "checkpoint": str(ckpt),
                     "eval": str(evals / f"{name}.json"), "t_star": float("nan") if t_star is None else t_star,
                     "curves": result["curves"], "retrieval": result["retrieval"],
                     "retrieval_lean": result["retrieval_lean"]})
        log.info("%s: P(own gender) %.3f at t=0, %.3f at t=1; t* = %.3f", method.name,
                 at_t(result["curves"], "p_true_gender", 0.0), at_t(result["curves"], "p_true_gender", 1.0),
                 rows[-1]["t_star"])

    log.info("5/5 svd_scale at t = 1 and t*, report")
    scaled = {}
    for row in rows:
        if "curves" not in row:
            continue
        for label, t in (("t1", 1.0), ("neutral", row["t_star"])):
            if np.isfinite(t):
                path = runs / "scaled" / f"{row['run']}.{label}.pt"
                runner.run(f"svd-scale-{row['run']}-{label}", svd_scale_argv(Path(row["checkpoint"]), t, path))
                scaled.setdefault(row["method"], {})[f"{t:g}"] = str(path)
    runner.timings["total"] = round(time.perf_counter() - t_start, 1)
    return write_gender_report(out, cfg=dataclasses.asdict(cfg), counts=counts, rows=rows, scaled=scaled,
                               pretrained=str(pretrained), timings=runner.timings)

