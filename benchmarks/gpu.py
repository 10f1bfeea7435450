"""One prepared command for a lent accelerator: PO and CLIP step costs on real architectures, the data side, and a
short training run. Random weights, synthetic data: nothing is downloaded.

    python benchmarks/gpu.py                        # CUDA: ViT-B-32 and ViT-L-14, about 3 min on one H100 (≤ 8)
    python benchmarks/gpu.py --device cpu --quick   # the same code on po-tiny: CI (tests/test_gpu_benchmark.py)

Writes a JSON of every figure, a PNG beside it, and a section of BENCHMARKS.md ("gpu" for the CUDA run). Only
``_device.py`` differs between devices (timing, memory statistics, the launched processes' environment).

What each figure is, and what limits it:

- **Step time** (``amp_bf16``, after warm-up, median of interleaved repeats; on a GPU CUDA events around each call,
  the queue drained before it): the CLIP step (ClipLoss, backward, AdamW) over the caption span and open_clip's
  stock step over the full context, and the PO step (DPO, policy on B images + 2B captions) with the online
  reference, the reference cache, ``--lock-text`` (with and without the cache), and the linear head; built as runs
  build them (``_steps.py``). **PO / CLIP time's floor is the FLOP ratio** (FlopCounterMode, counted in the same
  run): above it is overhead a FLOP count does not see — the caption span's one device-to-host read per text
  batch, the reference's text memo and the cache's per-sample joins on the host, kernel launches where the batch
  is small.
- **Peak memory** per step: its resident tensors on the device (weights, optimizer state, the online reference's
  weights; a cache's features live on the host) plus the rise of ``torch.cuda.max_memory_allocated`` over one step
  (activations, gradients). **PO over CLIP's floor is the activations of 2B captions where CLIP has B** (the
  cache) plus, online, the reference's weights; the caption span shrinks every caption's activations alike.
- **samples/s** of each step: batch / step time (no data loading).
- **Reference-cache build**: ``python -m open_clip_po.ref_cache`` over triplet and clean shards (samples/s of its
  pass: the run minus a rerun that finds every shard done). Its limit is decoding in the builder's one process per
  rank (no DataLoader workers), not the accelerator.
- **Triplet reader**: ``open_clip_po.data.get_po_data`` with DataLoader workers, 224 px JPEG, open_clip's train
  transform (second epoch, persistent workers). Its limit is JPEG decoding and augmentation, per core.
- **Training run**: ``torchrun --nproc_per_node 1 -m open_clip_po.main`` (ViT-B-32 on the GPU), 20 DPO steps with
  the KL regulariser, ``--precision amp_bf16``, ``--dist-backend nccl`` (gloo on the CPU): loss and reg_kl finite at
  every step. With one process open_clip makes no process group (it needs WORLD_SIZE > 1), so NCCL's collectives
  run only with ``--torchrun-procs 2`` on two GPUs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import open_clip  # noqa: E402
import _gpu_runs  # noqa: E402
from _device import Device, resident_bytes  # noqa: E402
from _gpu_report import section_name, write_outputs  # noqa: E402
from _steps import FAMILIES, build_family, make_batch  # noqa: E402
from _timing import count_flops, interleaved_step_medians  # noqa: E402

PRECISION = "amp_bf16"
STEPS = 20


@dataclass(frozen=True)
class Plan:
    models: tuple  # (name, batch sizes to try, largest first: a smaller one when the larger runs out of memory)
    warmup: int
    repeats: int
    data_samples: int  # triplets (and as many clean pairs) for the reader, the cache build and the training run
    shards: int
    train_model: str
    train_batch: int
    reader_batch: int
    words: tuple  # words per caption


FULL = Plan(models=(("ViT-B-32", (256,)), ("ViT-L-14", (128, 64))), warmup=3, repeats=10, data_samples=1024,
            shards=32, train_model="ViT-B-32", train_batch=256, reader_batch=32, words=(4, 18))
QUICK = Plan(models=(("po-tiny", (8,)), ("po-tiny", (4, 2))), warmup=1, repeats=3, data_samples=32, shards=4,
             train_model="po-tiny", train_batch=4, reader_batch=4, words=(2, 5))


def _workers(limit: int) -> int:
    """DataLoader workers: as many as the cores allow, among those that divide the run's steps."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(w for w in (1, 2, 4, 5, 10) if w <= min(cores, limit) and STEPS % w == 0)


def measure_family(base, family: str, batch_size: int, plan: Plan, device: Device) -> dict:
    batch = make_batch(base, batch_size, device.torch, words=plan.words)
    steps = build_family(base, family, batch, device.torch, PRECISION)
    flops = {name: count_flops(step) for name, step in steps.items()}  # also the first call of each
    times = interleaved_step_medians(steps, plan.repeats, clock=device.seconds, warmup=plan.warmup)
    out = {}
    for name, step in steps.items():
        rise = device.step_peak_rise(step)
        resident = resident_bytes(step.holds, device.torch)
        out[name] = {"ms": times[name] * 1e3, "samples_per_s": batch_size / times[name], "flops": flops[name],
                     "text_positions": step.text_positions, "resident_mb": resident / 2**20,
                     "peak_mb": None if rise is None else (resident + rise) / 2**20}
    del steps, batch
    device.free()
    return out


def measure_model(name: str, batch_sizes, plan: Plan, device: Device) -> dict:
    torch.manual_seed(0)
    base = open_clip.create_model(name, output_dict=True)  # random weights, on the host; each step takes a copy
    notes = []
    for batch_size in batch_sizes:
        failed = False
        try:
            families = {family: measure_family(base, family, batch_size, plan, device) for family in FAMILIES}
            return {"model": name, "batch_size": batch_size, "context_length": base.context_length,
                    "families": families, "notes": notes}
        except device.out_of_memory():
            failed = True  # handled below, once the exception (and the steps its frames hold) is gone
        if failed:
            notes.append(f"batch {batch_size}: out of memory")
            device.free()
    return {"model": name, "batch_size": None, "families": {}, "notes": notes}


def ratios(result: dict) -> list[dict]:
    """Per family and step: time, FLOPs and peak memory against the CLIP step over the same span and the stock."""
    rows = []
    for family, steps in result["families"].items():
        span, stock = steps["clip_span"], steps["clip_stock"]
        for name, s in steps.items():
            base = steps["frozen_forward"] if name == "po_head" else span
            rows.append({"family": family, "step": name, **{k: s[k] for k in ("ms", "samples_per_s", "peak_mb")},
                         "time_vs_baseline": s["ms"] / base["ms"], "flops_vs_baseline": s["flops"] / base["flops"],
                         "baseline": "frozen_forward" if name == "po_head" else "clip_span",
                         "time_vs_stock": s["ms"] / stock["ms"], "flops_vs_stock": s["flops"] / stock["flops"],
                         "memory_vs_clip_span": (s["peak_mb"] / span["peak_mb"]) if s["peak_mb"] and
                         span["peak_mb"] else None, "text_positions": s["text_positions"]})
    return rows


def run(args) -> dict:
    plan, device = (QUICK if args.quick else FULL), Device(args.device)
    started, stages = time.perf_counter(), {}

    def stage(name, fn):
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        result = fn()
        stages[name] = time.perf_counter() - t
        return result

    report = {"device": device.describe(), "precision": PRECISION, "quick": args.quick, "plan": asdict(plan),
              "measured": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "open_clip": open_clip.__version__, "command": " ".join(["python", "benchmarks/gpu.py", *args.argv]),
              "models": []}
    name, sizes = plan.models[0]
    report["models"].append(stage(f"steps {name}", lambda: measure_model(name, sizes, plan, device)))
    with tempfile.TemporaryDirectory() as tmp:
        size = open_clip.get_model_config(plan.train_model)["vision_cfg"]["image_size"]
        data = stage("shards", lambda: _gpu_runs.triplet_shards(Path(tmp), plan.data_samples, size, plan.shards,
                                                               _workers(8)))
        report["training_run"] = stage("training run", lambda: _gpu_runs.training_run(
            data, plan.train_model, plan.train_batch, _workers(10), STEPS, PRECISION, device, args.torchrun_procs))
        report["cache_build"] = stage("reference-cache build", lambda: _gpu_runs.cache_build(
            data, plan.train_model, plan.train_batch, PRECISION, device.child_env()))
        report["reader"] = stage("triplet reader", lambda: _gpu_runs.reader(
            data, plan.train_model, plan.reader_batch, _workers(plan.shards)))
    for name, sizes in plan.models[1:]:
        report["models"].append(stage(f"steps {name}", lambda: measure_model(name, sizes, plan, device)))
    for model in report["models"]:
        model["ratios"] = ratios(model)
    report["stages_s"], report["total_s"] = stages, time.perf_counter() - started
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="po-tiny, tiny batches, few repeats (the CI smoke run)")
    parser.add_argument("--torchrun-procs", type=int, default=1,
                        help="processes of the training run (2 on two GPUs exercises NCCL's collectives)")
    parser.add_argument("--json", default=None, help="default: benchmarks/gpu.json for the CUDA run, else "
                                                     "benchmarks/out/gpu-<device>[-quick].json; a PNG goes beside it")
    parser.add_argument("--markdown", default=None,
                        help="file whose section is replaced (default: BENCHMARKS.md, none for --quick; 'none' "
                             "writes none)")
    args = parser.parse_args(argv)
    args.argv = argv
    report = run(args)
    device_type = torch.device(args.device).type
    stem = "gpu" if device_type == "cuda" and not args.quick else f"gpu-{device_type}{'-quick' if args.quick else ''}"
    json_path = Path(args.json or (HERE / (f"{stem}.json" if stem == "gpu" else f"out/{stem}.json")))
    if args.markdown == "none" or (args.markdown is None and args.quick):
        markdown = None  # a smoke run's figures do not belong in BENCHMARKS.md unless asked for
    else:
        markdown = Path(args.markdown or HERE.parent / "BENCHMARKS.md")
    write_outputs(report, json_path, markdown, section_name(device_type, args.quick))
    failed = not report["training_run"]["finite"] or any(m["batch_size"] is None for m in report["models"])
    print(f"done in {report['total_s'] / 60:.1f} min: {json_path}" + (f", {markdown}" if markdown else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
