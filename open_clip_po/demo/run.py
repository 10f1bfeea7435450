"""``run_demo(cfg, out)``: every stage of the demo, in order; returns the report dict."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from .commands import (cached_reference, finetune_argv, pretrain_argv, ref_cache_argv, typographic_argv,
                       typographic_data, zeroshot_argv)
from .pipeline import TEMPLATE, DemoConfig, Runner, StageError, checkpoint_of, fresh, read_metrics
from .typographic_report import write_report
from .world import TextStyle, world_classes
from .world_files import examples_grid, write_class_folder, write_classnames, write_pretrain_set, write_world_json

log = logging.getLogger("open_clip_po.demo")


def build_world(cfg: DemoConfig, out: Path, quiet: bool, pretraining: bool = True) -> dict:
    world = fresh(out / "world")
    world.mkdir(parents=True)
    classes = world_classes(cfg.num_classes)
    style = TextStyle(size_range=cfg.text_size_224)
    counts = {}
    for stage in cfg.stages if pretraining else ():
        counts[f"pretrain-{stage.name}"] = write_pretrain_set(world, classes, stage.per_class, stage.mix, cfg.seed,
                                                             style, cfg.image_size, quiet, f"pretrain-{stage.name}")
    counts["train"] = write_class_folder(world / "train", classes, cfg.train_per_class, cfg.seed, cfg.image_size,
                                         quiet)
    counts["test"] = write_class_folder(world / "test", classes, cfg.test_per_class, cfg.seed + 1000,
                                        cfg.image_size, quiet)
    write_classnames(world / "classnames.txt", classes)
    write_world_json(world / "world.json", classes, counts)
    return counts


def run_demo(cfg: DemoConfig, out: Path, *, pretrained: Path | None = None, quiet: bool = False,
             threads: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.txt").write_text("", encoding="utf-8")
    runner = Runner(out, threads)
    t_start = time.perf_counter()
    runs = out / "runs"

    if cfg.quick:
        log.info("--quick: a pipeline check (small world, short training, minutes not hours); its report checks "
                 "its own targets and shows the full demo's claim separately (not expected of --quick)")
    log.info("1/5 world: %d classes, %s pre-training images per class", cfg.num_classes,
             " + ".join(str(s.per_class) for s in cfg.stages))
    counts = runner.timed("world", build_world, cfg, out, quiet, pretrained is None)

    if pretrained is None:
        for stage in cfg.stages:
            log.info("2/5 pre-training %s with open_clip's trainer: stage %r (%d epochs)", cfg.model, stage.name,
                     stage.epochs)
            fresh(runs / f"pretrain-{stage.name}")
            runner.run(f"pretrain-{stage.name}", pretrain_argv(cfg, stage.name, stage.epochs,
                                                               out / "world" / f"pretrain-{stage.name}", runs,
                                                               pretrained))
            pretrained = checkpoint_of(runs, f"pretrain-{stage.name}")

    log.info("3/5 typographic shards and the attacked test set")
    fresh(out / "shards"), fresh(out / "world" / "test_attacked")
    runner.run("shards", typographic_argv(cfg, out))
    examples_grid(out / "world", out / "world_examples.png")

    test, attacked = out / "world" / "test", out / "world" / "test_attacked"
    evals = fresh(out / "eval")
    evals.mkdir()
    rows = []
    runner.eval("eval-pretrained", zeroshot_argv(cfg, pretrained, test, attacked, evals / "pretrained.json"))
    rows.append({"method": "pre-trained", "loss": None, "head": False, "checkpoint": str(pretrained),
                 **read_metrics(evals / "pretrained.json")})
    log.info("pre-trained: %s", _fmt(rows[-1]))

    rows += _fine_tune(cfg, out, runner, pretrained, test, attacked, evals)
    sweep = _kl_and_sweep(cfg, runner, rows, pretrained, test, attacked, evals)

    runner.timings["total"] = round(time.perf_counter() - t_start, 1)
    return write_report(out, cfg=dataclasses.asdict(cfg), counts=counts, rows=rows, sweep=sweep,
                        timings=runner.timings)


def _fine_tune(cfg, out, runner, pretrained, test, attacked, evals) -> list[dict]:
    """Stage 4: every method through torchrun; the full fine-tunes read a reference cache built once."""
    log.info("4/5 fine-tuning: %s", ", ".join(m.name for m in cfg.methods))
    runs, cache, rows = out / "runs", out / "ref_cache", []
    if any(not m.head for m in cfg.methods):  # heads need none: their reference is the frozen backbone
        runner.run("ref-cache", ref_cache_argv(cfg, pretrained, out / "shards", fresh(cache)))
    for method in cfg.methods:
        name = method.slug
        fresh(runs / name)
        try:
            data = typographic_data(out / "shards") + ([] if method.head else cached_reference(cache))
            runner.run(f"finetune-{name}", finetune_argv(cfg, method, pretrained, data, runs, name))
        except StageError as e:
            log.error("%s", e)
            rows.append({"method": method.name, "loss": method.loss, "head": method.head, "error": str(e)})
            continue
        ckpt = checkpoint_of(runs, name)
        runner.eval(f"eval-{name}", zeroshot_argv(cfg, ckpt, test, attacked, evals / f"{name}.json"))
        rows.append({"method": method.name, "loss": method.loss, "head": method.head, "checkpoint": str(ckpt),
                     **read_metrics(evals / f"{name}.json")})
        log.info("%s: %s", method.name, _fmt(rows[-1]))
    return rows


def _kl_and_sweep(cfg, runner, rows, pretrained, test, attacked, evals) -> dict | None:
    """Stage 5: KL to the reference for every tuned model (into ``rows``), the t-sweep of the first head."""
    log.info("5/5 KL to the reference, t-sweep, report")
    tuned = [r for r in rows[1:] if "checkpoint" in r]
    if tuned:
        kl_argv = ["kl", "--model", cfg.model, "--pretrained", *[r["checkpoint"] for r in tuned],
                   "--ref-pretrained", str(pretrained), "--images", str(test), "--template", TEMPLATE,
                   "--workers", "0", "--output", str(evals / "kl.json")]
        for r in tuned:
            kl_argv += ["--label", r["method"]]
        runner.eval("eval-kl", kl_argv)
        kl = json.loads((evals / "kl.json").read_text(encoding="utf-8"))["metrics"]
        for r in tuned:
            r["kl_to_ref"] = kl[r["method"]]["kl_mean"]
    rows[0]["kl_to_ref"] = 0.0
    head_rows = [r for r in tuned if r["head"] and r["loss"] != "ce"]
    if not head_rows:
        return None
    sweep_argv = ["tsweep", "--model", cfg.model, "--pretrained", head_rows[0]["checkpoint"], "--images",
                  str(test), "--typographic", str(attacked), "--template", TEMPLATE, "--t", cfg.sweep_t,
                  "--workers", "0", "--output", str(evals / "tsweep.json")]
    runner.eval("eval-sweep", sweep_argv)
    return {"method": head_rows[0]["method"], **json.loads((evals / "tsweep.json").read_text(encoding="utf-8"))}


def _fmt(row: dict) -> str:
    return (f"clean {100 * row['clean']:.1f}%, attacked {100 * row['attacked']:.1f}%, "
            f"written-class {100 * row['written_rate']:.1f}%")
