"""``eval benchmark``: every row (model) on every data set, clean and typographic, then the tables.

Each process loads the rows one after the other, evaluates its share of each data set's images (clean view,
typographic copy or both in one pass), and keeps per-image predictions; they are gathered once at the end and
rank 0 computes the metrics and writes ``OUTPUT/results.json``, ``table1.{md,csv,png}`` and
``table2.{md,csv,png}`` (each table only when its data sets were asked for).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ...atomic import write_json
from ..errors import EvalError
from . import cbench
from .attack import TypographicCopy
from .catalog import REAL, parse_datasets
from .distributed import init_world
from .evaluate import merge, predict, split_metrics
from .models import load_row, plan_rows
from .samples import Prepare
from .save import CopyWriter
from .sources import apply_overrides, locate, read_classnames_overrides
from .tables import average, kinds, plot_bars, table1, table2, write_tables

log = logging.getLogger(__name__)


def locate_all(sets, root: str, split: str) -> list:
    """Every set found, or one error listing each one that is not (a line per set)."""
    found, missing = [], []
    for spec in sets:
        try:
            found.append(locate(spec, root, split))
        except EvalError as e:
            missing.append(str(e))
    if missing:
        raise EvalError("\n".join(missing))
    return found


def views_for(spec, typographic: bool) -> tuple[str, ...]:
    if spec.kind == REAL:
        return ("real",)
    return ("clean", "attacked") if typographic else ("clean",)


def _saver(writer: CopyWriter):
    def on_batch(batch):
        for index, label, written, saved in zip(batch["index"].tolist(), batch["label"].tolist(),
                                                batch["written"].tolist(), batch["saved"]):
            writer.add(index, label, written, *saved)
    return on_batch


def _evaluate_rows(args, world, device, rows, located) -> tuple[dict, dict, dict]:
    import open_clip

    tokenizer = open_clip.get_tokenizer(args.model)
    results, writers, copy = {}, {}, None
    for number, row in enumerate(rows):
        model, preprocess = load_row(args.model, row, device)
        for found in located:
            key, views = found.spec.key, views_for(found.spec, args.typographic)
            attack = None
            if "attacked" in views:
                attack = TypographicCopy(found.classnames, key, args.seed, args.typographic_fonts)
                copy = attack.describe()
            writer = None
            if attack is not None and args.save_typographic and number == 0:
                folder = Path(args.save_typographic) / found.spec.copy_folder
                writer = writers[key] = CopyWriter(folder, args.split, world.rank, found.classnames, found.templates,
                                                   {"source": found.describe(), **attack.describe()})
            samples = found.make(Prepare(preprocess, views, attack, keep_copy=writer is not None), world.rank,
                                 world.size)
            classifier = cbench.zero_shot_classifier(model, tokenizer, found.classnames, found.templates, device,
                                                     args.amp, show_progress=world.is_main)
            results[row.label, key] = predict(
                model, classifier, samples, views, device=device, amp=args.amp, batch_size=args.batch_size,
                workers=args.workers, desc=f"{row.label} · {key}", show=world.is_main,
                on_batch=_saver(writer) if writer is not None else None)
            if writer is not None:
                writer.close()
        del model
    return results, writers, copy


def _rows_with_metrics(args, rows, located, gathered) -> list[dict]:
    out = []
    for row in rows:
        entry = {**row.describe(), "datasets": {}}
        for found in located:
            merged = merge([part[row.label, found.spec.key] for part in gathered], found.spec.key)
            entry["datasets"][found.spec.key] = {
                "dataset": found.clip_benchmark_name or found.spec.key, "task": "zeroshot_classification",
                "language": "en", "metrics": split_metrics(merged, len(found.classnames))}
        out.append(entry)
    return out


def _write_report(args, world, rows: list[dict], located, copy) -> list[Path]:
    sets = [f.spec for f in located]
    synthetic, real = kinds(sets)
    out = Path(args.output)
    for row in rows:
        row["average"] = {}
        if synthetic:
            keys = [s.key for s in synthetic]
            row["average"]["table1"] = {"clean_acc1": average(row, keys, "clean")}
            if args.typographic:
                row["average"]["table1"].update(typographic_acc1=average(row, keys, "typographic"),
                                                typographic_written_rate=average(row, keys, "typographic",
                                                                                 "written_rate"))
        if real:
            keys = [s.key for s in real]
            row["average"]["table2"] = {"acc1": average(row, keys, "typographic"),
                                        "written_rate": average(row, keys, "typographic", "written_rate")}
    written = [write_json({
        "task": "zeroshot_classification", "model": args.model, "split": args.split, "processes": world.size,
        "amp": args.amp, "typographic": args.typographic, "typographic_copy": copy,
        "datasets": {f.spec.key: {"title": f.spec.title, "kind": f.spec.kind, **f.describe()} for f in located},
        "rows": rows}, out / "results.json")]
    if synthetic:
        tables = table1(rows, synthetic, args.typographic)
        note = ("T: Defense-Prefix's typographic copy of each image (open_clip_po.eval.benchmark.attack), seed "
                f"{args.seed}." if args.typographic else "")
        written += write_tables(tables, out / "table1", note)
        bars = ["O", "T"] if args.typographic else ["O"]
        written.append(plot_bars(tables[0], [s.title for s in synthetic] + ["Avg."], bars, out / "table1.png",
                                 f"{args.model}: zero-shot top-1, original (O) and typographic (T)"))
    if real:
        tables = table2(rows, real)
        written += write_tables(tables, out / "table2")
        written.append(plot_bars(tables[0], [s.title for s in real] + ["Avg."], [""], out / "table2.png",
                                 f"{args.model}: zero-shot top-1 on real typographic images"))
    return written


def run_benchmark(args) -> list[dict] | None:
    """The ``benchmark`` subcommand; returns the rows with their metrics on rank 0 (None on the others)."""
    world, device = init_world(args.device)
    try:
        sets = parse_datasets(args.datasets)
        if not args.pretrained and not args.check_data:
            raise EvalError("--pretrained is required: one or more checkpoint files or pretrained tags")
        rows = plan_rows(args.pretrained or [], args.label, args.weights, args.interpolate, args.alpha)
        overrides = read_classnames_overrides(args.classnames)
        located = [apply_overrides(found, templates_from=args.templates, templates=args.template, classnames=overrides)
                   for found in locate_all(sets, args.dataset_root, args.split)]
        if args.check_data:
            for found in located:
                print(f"{found.spec.key}: {found.layout} at {found.path}, {len(found.classnames)} classes")
            return None
        results, writers, copy = _evaluate_rows(args, world, device, rows, located)
        gathered = world.gather(results)  # the one collective: every process's predictions
        if not world.is_main:
            return None
        for writer in writers.values():
            shards = writer.publish(world.size)
            log.info("typographic copy: %d shards in %s", shards, writer.folder)
        rows_out = _rows_with_metrics(args, rows, located, gathered)
        written = _write_report(args, world, rows_out, located, copy)
        for path in written:
            if path.suffix == ".md":
                print(path.read_text(encoding="utf-8"))
        print("wrote " + ", ".join(str(p) for p in written))
        return rows_out
    finally:
        world.close()
