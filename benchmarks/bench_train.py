"""PO step vs open_clip's CLIP step on the same model and inputs, measured in one run: time and FLOPs side by side.

The steps are built as runs build them (``_steps.py``): a PO step (DPO; policy on B images + 2B captions) with the
frozen reference online, read from a reference cache, or as the base of a linear head, and open_clip's CLIP step
(ClipLoss on B images + B captions, backward, AdamW) in two forms:

- **over the caption span** — the headline baseline, like for like: the PO step's text tower runs over each
  batch's caption span (``open_clip_po.towers.text_span``), and so does a plain CLIP run through ``open_clip_po.main``;
- **stock** — open_clip's own step, its text tower over all ``context_length`` positions, beside it.

Captions are shaped like PO's (the start token, 4–18 random word tokens, the end token, zero padding); distinct
captions never repeat, so the reference's text memo starts empty every step, while with class-template captions it
is warm. One row keeps captions that fill the whole context, where no span is shorter than the context: the
structural cost of a PO step, 2B full-length captions where CLIP encodes B. ``--lock-text``: both with the text
tower locked (the reference then shares the policy's text features). Linear head: a PO step training only W,
against a forward of the frozen backbone over the same span (its floor). ``amp_bf16``: the full fine-tune steps
again under open_clip's ``--precision amp_bf16`` autocast (bfloat16 on CPU).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one step of each (not timed, so the
machine's load does not enter): the FLOP ratio is the floor a time ratio tends to, and the goal of each time row is
to be within 10 % of it. Peak memory: the rise of the process's peak RSS over its post-setup level, each step kind
in a fresh subprocess (``benchmarks/gpu.py`` reads ``torch.cuda.max_memory_allocated`` on a GPU).
"""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys

import torch

from _steps import build_family, make_batch
from _timing import count_flops, interleaved_step_medians

MODEL, BATCH = "ViT-B-32", 8  # a real architecture (random weights, nothing downloaded)
QUICK_MODEL = "po-tiny"
CLASSES = 10  # e.g. a 10-class typographic set: y_w / y_l are "a photo of a {class}."
MEMORY_BATCH = 32  # large enough that activations, not model set-up, set the peak
TIME_SLACK = 1.1  # a time ratio within 10 % of its FLOP ratio is at its floor


def words_for(model) -> tuple[int, int]:
    """PO-length captions (4–18 words) in a 77-token context; 2–5 words in a tiny model's 16 (a span still shorter
    than the context)."""
    return (4, 18) if model.context_length >= 32 else (2, 5)


def family_steps(family: str, model_name: str, wanted, precision: str = "fp32", batch_size: int = BATCH,
                 class_captions: int = 0, full_context: bool = False):
    import open_clip

    torch.manual_seed(0)
    base = open_clip.create_model(model_name, output_dict=True)
    batch = make_batch(base, batch_size, "cpu", class_captions=class_captions, full_context=full_context,
                       words=words_for(base))
    return build_family(base, family, batch, "cpu", precision, wanted)


DISTINCT = "distinct PO-length captions: SOT, 4–18 words, EOT, zero padding"
FULL_CONTEXT = "distinct captions filling the whole context"
LABELS = {("full", "po_online"): "full fine-tune", ("full", "po_cache"): "full fine-tune, reference cache",
          ("lock_text", "po_online"): "--lock-text", ("lock_text", "po_cache"): "--lock-text, reference cache"}
FLOOR_NOTES = {  # what the FLOP ratio is made of, where it is a floor
    ("full", "po_cache"): "the policy alone, the floor of a PO step: 2B captions where CLIP encodes B",
    ("lock_text", "po_cache"): "the policy alone (the text tower frozen, no reference)"}


def measure(steps: dict, repeats: int) -> tuple[dict, dict]:
    """FLOPs of one call and median seconds (interleaved) per named step."""
    flops = {name: count_flops(step) for name, step in steps.items()}
    return flops, interleaved_step_medians(steps, repeats)


def po_clip_row(family, name, steps, flops, times, captions, model_name, repeats, note="", mode_note="") -> dict:
    """A PO step against the CLIP step over the same caption span (the value) and open_clip's stock step."""
    po, span, stock = steps[name], steps["clip_span"], steps["clip_stock"]
    ratio, flop_ratio = times[name] / times["clip_span"], flops[name] / flops["clip_span"]
    stock_ratio, stock_flops = times[name] / times["clip_stock"], flops[name] / flops["clip_stock"]
    floor = FLOOR_NOTES.get((family, name))
    if floor and captions == FULL_CONTEXT:
        floor = "the policy alone encoding 2B captions over the whole context where CLIP encodes B: the structural cost"
    return {"name": f"PO step / CLIP step over the same caption span, {LABELS[(family, name)]}{mode_note} ({captions})",
            "value": ratio, "unit": "×",
            "goal": f"≤ {TIME_SLACK} × FLOP ratio", "met": ratio <= TIME_SLACK * flop_ratio,
            "details": f"FLOP ratio {flop_ratio:.2f}{f' = {floor}' if floor else ''}; against open_clip's stock "
                       f"full-context CLIP step {stock_ratio:.3g} × (FLOP ratio {stock_flops:.2f}); text tower over "
                       f"{po.text_positions} positions (CLIP over the span: {span.text_positions}; stock: all "
                       f"{stock.text_positions}); {model_name}, batch {BATCH}{note}, medians of {repeats}: "
                       f"{times[name] * 1e3:.1f} ms vs {times['clip_span'] * 1e3:.1f} ms (stock "
                       f"{times['clip_stock'] * 1e3:.1f} ms)"}


def plain_clip_row(steps, flops, times, model_name, repeats) -> dict:
    """What the caption span saves a plain CLIP run through ``open_clip_po.main``."""
    ratio, flop_ratio = times["clip_span"] / times["clip_stock"], flops["clip_span"] / flops["clip_stock"]
    return {"name": f"CLIP step over the caption span / open_clip's stock CLIP step (plain CLIP training through "
                    f"open_clip_po.main; {DISTINCT})", "value": ratio, "unit": "×",
            "goal": f"≤ {TIME_SLACK} × FLOP ratio", "met": ratio <= TIME_SLACK * flop_ratio,
            "details": f"FLOP ratio {flop_ratio:.2f}; text tower over {steps['clip_span'].text_positions} of "
                       f"{steps['clip_stock'].text_positions} positions, the same features and gradients "
                       f"(tests/test_plain_clip_span.py); {model_name}, batch {BATCH}, medians of {repeats}: "
                       f"{times['clip_span'] * 1e3:.1f} ms vs {times['clip_stock'] * 1e3:.1f} ms"}


def head_row(steps, flops, times, model_name, repeats) -> dict:
    ratio, flop_ratio = times["po_head"] / times["frozen_forward"], flops["po_head"] / flops["frozen_forward"]
    return {"name": f"PO step (linear head) / frozen-backbone forward ({DISTINCT})", "value": ratio, "unit": "×",
            "goal": "≤ 1.1", "met": ratio <= 1.1,
            "details": f"FLOP ratio {flop_ratio:.2f}; text tower over {steps['po_head'].text_positions} positions in "
                       f"both; {model_name}, batch {BATCH}, medians of {repeats}: {times['po_head'] * 1e3:.1f} ms vs "
                       f"{times['frozen_forward'] * 1e3:.1f} ms"}


BF16_REFERENCE_NOTE = ("the online reference's attention runs the policy's GEMMs under autocast "
                       "(open_clip_po/attention_layout.py; docs/training.md)")


def measured(family: str, model_name: str, wanted, repeats: int, **kw):
    """(steps, FLOPs, median seconds) of one family. Families are measured one at a time (each holds up to four
    copies of the model and two optimizers)."""
    gc.collect()
    steps = family_steps(family, model_name, wanted, **kw)
    return (steps, *measure(steps, repeats))


def step_rows(model_name: str, repeats: int) -> list[dict]:
    rows = []
    steps, flops, times = measured("full", model_name, ("clip_span", "clip_stock", "po_online", "po_cache"), repeats)
    rows.append(plain_clip_row(steps, flops, times, model_name, repeats))
    rows.append(po_clip_row("full", "po_online", steps, flops, times, DISTINCT, model_name, repeats))
    cache_row = po_clip_row("full", "po_cache", steps, flops, times, DISTINCT, model_name, repeats)
    del steps
    bf16 = measured("full", model_name, ("po_online", "clip_span", "clip_stock"), repeats, precision="amp_bf16")
    rows.append(po_clip_row("full", "po_online", *bf16, DISTINCT, model_name, repeats,
                            note=f", amp_bf16 (bfloat16 autocast on CPU); {BF16_REFERENCE_NOTE}",
                            mode_note=", amp_bf16"))
    del bf16
    rows.append(cache_row)
    rows.append(head_row(*measured("full", model_name, ("po_head", "frozen_forward"), repeats), model_name, repeats))
    rows.append(po_clip_row("full", "po_online", *measured("full", model_name, ("po_online", "clip_span", "clip_stock"),
                                                           repeats, class_captions=CLASSES),
                            f"{CLASSES}-class template captions, PO-length; the reference's text memo warm",
                            model_name, repeats))
    rows.append(po_clip_row("full", "po_cache", *measured("full", model_name, ("po_cache", "clip_span", "clip_stock"),
                                                          repeats, full_context=True),
                            FULL_CONTEXT, model_name, repeats))
    locked = measured("lock_text", model_name, None, repeats)
    for name in ("po_online", "po_cache"):
        rows.append(po_clip_row("lock_text", name, *locked, DISTINCT, model_name, repeats))
    return rows


def _precompute_row(model_name: str, samples: int) -> dict:
    """``python -m open_clip_po.ref_cache`` over shards vs a plain no-grad forward over the same shards (same
    reading and decoding, images and both captions encoded, nothing written)."""
    import tempfile
    import time
    from pathlib import Path

    import torch

    import open_clip
    from open_clip_po.data.decode import decode_triplet
    from open_clip_po.data.skips import SkipCounter
    from open_clip_po.data.tar import read_samples
    from open_clip_po.checkpoint import atomic_save
    from open_clip_po.ref_cache.build import Encoder, shard_features

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from po_toy import write_toy_shards

    with tempfile.TemporaryDirectory() as tmp:
        model = open_clip.create_model(model_name)
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        write_toy_shards(Path(tmp, "shards"), num_samples=samples, per_shard=samples // 2, image_size=size)
        model, preprocess, _ = open_clip.create_model_and_transforms(model_name, aug_cfg={"scale": (1.0, 1.0)})
        tokenizer = open_clip.get_tokenizer(model_name)
        shards = sorted(str(p) for p in Path(tmp, "shards").glob("pref-*.tar"))

        @torch.no_grad()
        def plain():
            batch = []
            for sample in read_samples(shards, SkipCounter()):
                batch.append(decode_triplet(sample, preprocess, lambda t: tokenizer([t])[0], SkipCounter()))
                if len(batch) == BATCH:
                    model.encode_image(torch.stack([b[0] for b in batch]), normalize=True)
                    model.encode_text(torch.stack([b[1] for b in batch] + [b[2] for b in batch]), normalize=True)
                    batch = []

        encoder = Encoder(model, "fp32", torch.device("cpu"))

        def precompute():  # the build's pass: per shard, features computed and written atomically
            for i, url in enumerate(shards):
                atomic_save(shard_features(url, "pref", encoder, preprocess, lambda t: tokenizer([t])[0], BATCH),
                            Path(tmp, "cache", f"{i}.pt"))

        times = {}
        for name, fn in (("plain", plain), ("precompute", precompute), ("plain", plain), ("precompute", precompute)):
            start = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - start)
    t_plain, t_pre = statistics.mean(times["plain"]), statistics.mean(times["precompute"])
    ratio = t_plain / t_pre
    return {"name": "reference-cache precompute throughput / plain no-grad forward over the same shards",
            "value": ratio, "unit": "×", "goal": "≥ 0.9", "met": ratio >= 0.9,
            "details": f"{model_name}, {samples} samples in 2 shards, batch {BATCH}, mean of 2 each: "
                       f"{samples / t_pre:.1f} vs {samples / t_plain:.1f} samples/s (the pass; the model is built "
                       "once before either)"}


def run(quick: bool = False) -> list[dict]:
    repeats, model_name = (3, QUICK_MODEL) if quick else (5, MODEL)
    rows = step_rows(model_name, repeats)
    rows.append(_precompute_row(model_name, 32 if quick else 64))
    rows += memory_rows(model_name)
    return rows


def _peak_rss_rise(which: str, steps: int, model_name: str) -> float:
    """MB by which ``steps`` calls of the step ``which`` raise resident memory above what set-up left: the peak
    during the steps (VmHWM, reset after set-up through /proc/self/clear_refs) minus the RSS they start from, in a
    fresh process. A peak over the process's lifetime would hide the steps behind set-up's own peak (building the
    cache runs the reference at batch 32)."""
    code = f"""
import gc, re, sys
sys.path.insert(0, {repr(str(__import__('pathlib').Path(__file__).parent))})
import bench_train as b
step = b.family_steps("full", {model_name!r}, [{which!r}], batch_size={MEMORY_BATCH})[{which!r}]
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
base = status("VmRSS")
for _ in range({steps}):
    step()
print((status("VmHWM") - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_rows(model_name: str) -> list[dict]:
    """Peak-memory rise of two PO steps over two CLIP steps over the same caption span (and open_clip's stock
    step), without and with the reference cache."""
    rows = []
    clip = {which: _peak_rss_rise(which, 2, model_name) for which in ("clip_span", "clip_stock")}
    for which, goal in (("po_online", 1.30), ("po_cache", 1.40)):
        po_mb = _peak_rss_rise(which, 2, model_name)
        ratio = po_mb / clip["clip_span"] if clip["clip_span"] > 0 else float("nan")
        cached = which == "po_cache"
        rows.append({"name": f"peak memory PO / CLIP over the same caption span (full fine-tune"
                             f"{', reference cache' if cached else ''})",
                     "value": ratio, "unit": "×", "goal": f"≤ {goal:.2f}", "met": ratio <= goal,
                     "details": f"rise of peak RSS during 2 steps over the RSS they start from: {po_mb:.0f} MB vs "
                                f"{clip['clip_span']:.0f} MB (open_clip's stock step: {clip['clip_stock']:.0f} MB, "
                                f"ratio {po_mb / clip['clip_stock']:.3g}); {model_name}, batch {MEMORY_BATCH}"
                                f"{'; no reference model in memory' if cached else ''}"})
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
