"""PO step vs open_clip CLIP step on the same model and inputs, measured in one run: time and FLOPs side by side.

- full fine-tune: POCriterion (policy on B images + 2B captions, frozen reference forward, DPO) + backward +
  AdamW step, against open_clip's ClipLoss on B images + B captions + backward + step; with distinct captions
  the reference's text memo starts empty every step (they would not repeat in real data), with class-template
  captions it is warm (they do);
- captions are shaped like PO's: the start token 49406, 4–18 random word tokens, the end token 49407, zero
  padding. The PO model is set up as a PO run sets it up: its text tower (and its reference's) runs over each
  batch's caption span (``open_clip_po.towers.text_span``). The CLIP baseline is open_clip's model as open_clip builds it,
  its ClipLoss step over all ``context_length`` positions. One row keeps captions that fill the whole context
  (start token, words, end token at the last position), where no span is shorter than the context: the structural
  cost of a PO step, 2B full-length captions where CLIP encodes B;
- ``--lock-text``: both with the text tower locked (the reference then shares the policy's text features);
- linear head: a PO step training only W, against a forward of the frozen backbone (its text tower over the same
  span) on the same inputs;
- reference cache (``--po-ref-cache``): the reference's features are looked up, not computed — the step is the
  policy's alone (2B captions instead of B are its only extra cost over CLIP);
- ``amp_bf16``: the full fine-tune pair again, both steps under open_clip's ``--precision amp_bf16`` autocast
  (bfloat16 on CPU), beside the fp32 row;
- FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one step of each (not timed, so the
  machine's load does not enter): where timing noise hides a ratio, the count shows it;
- peak memory: the rise of the process's peak RSS over its post-setup level, PO vs CLIP, each in a fresh
  subprocess (on GPU one would read torch.cuda.max_memory_allocated; this machine has none).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

from _timing import count_flops, interleaved_medians

MODEL, BATCH = "ViT-B-32", 8  # a real architecture (random weights, nothing downloaded)
QUICK_MODEL = "po-tiny"
CLASSES = 10  # e.g. a 10-class typographic set: y_w / y_l are "a photo of a {class}."
MEMORY_BATCH = 32  # large enough that activations, not model set-up, set the peak


def _in_memory_cache(reference_model, images, texts, keys):
    """A CachedReference over features computed here, as ``python -m open_clip_po.ref_cache`` would store them."""
    from pathlib import Path

    import torch

    from open_clip_po.ref_cache import RefCache
    from open_clip_po.reference import CachedReference

    with torch.no_grad():
        image = reference_model.encode_image(images, normalize=True)
        unique = torch.unique(texts, dim=0)
        text = reference_model.encode_text(unique, normalize=True)
    cache = RefCache(Path("."), float(reference_model.logit_scale.exp()), {k: (0, i) for i, k in enumerate(keys)},
                     [image], {row.tobytes(): j for j, row in enumerate(unique.numpy())}, text)
    return CachedReference(cache)


SOT, EOT = 49406, 49407  # open_clip's tokenizer: start and end of text (the end token has the largest id)
WORDS = (4, 18)  # words per PO-length caption, e.g. "a photo of a dog." is 5


def po_captions(count: int, context_length: int, generator, full_context: bool = False):
    """Token rows shaped like PO captions: SOT, 4–18 random word tokens, EOT, zero padding; with ``full_context``
    words up to the last position, which holds EOT (the whole context is the caption)."""
    import torch

    rows = torch.zeros(count, context_length, dtype=torch.long)
    for row in rows:
        words = context_length - 2 if full_context else \
            min(int(torch.randint(WORDS[0], WORDS[1] + 1, (1,), generator=generator)), context_length - 2)
        row[0], row[words + 1] = SOT, EOT
        row[1:words + 1] = torch.randint(1, 5000, (words,), generator=generator)
    return rows


def _setup(mode: str, batch: int = BATCH, model_name: str = MODEL, class_captions: int = 0, cached: bool = False,
           full_context: bool = False):
    import copy

    import torch

    import open_clip
    import open_clip_po  # noqa: F401
    from open_clip_po.criterion import POCriterion, POSettings
    from open_clip_po.head import attach_linear_head
    from open_clip_po.losses import get_loss
    from open_clip_po.reference import make_reference
    from open_clip_po.towers.text_span import caption_span, run_text_over_caption_span

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True)
    clip_model = copy.deepcopy(model)  # the CLIP baseline: open_clip's text tower over the whole context
    run_text_over_caption_span(model)  # as a PO run's ModelSetup does, before the reference copy and the head
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size)
    g = torch.Generator().manual_seed(0)
    chosen, rejected = po_captions(2 * batch, model.context_length, g, full_context).split(batch)
    if class_captions:  # typographic data: y_w and y_l are class templates, so captions repeat in a batch
        prompts = po_captions(class_captions, model.context_length, g, full_context)
        chosen, rejected = prompts[torch.randint(class_captions, (2, batch), generator=g)]
    reference = make_reference(copy.deepcopy(model), shares_text=(mode == "lock_text"))
    keys = [f"bench/{i}" for i in range(batch)]
    if cached:
        reference = _in_memory_cache(reference.model, images, torch.cat([chosen, rejected]), keys)
    if mode == "lock_text":
        for m in (model, clip_model):
            m.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if mode == "head":
        model.requires_grad_(False)
        attach_linear_head(model).requires_grad_(True)
        reference = make_reference(is_base_of_head=True)
    criterion = POCriterion(get_loss("dpo"), reference, POSettings(reg_lambda=0.0))
    clip_loss = open_clip.ClipLoss()
    opt, clip_opt = (torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                     for m in (model, clip_model))
    batch = {"images": images, "chosen": chosen, "rejected": rejected, "keys": keys}

    def po_step():
        if not class_captions and getattr(reference, "model", None) is not None:
            # Distinct captions never come back in real data: the reference's text memo must not help here.
            reference.text_cache.clear()
        out = criterion(model, batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()

    def clip_step():
        out = clip_model(images, chosen)
        clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        clip_opt.step()
        clip_opt.zero_grad()

    @torch.no_grad()
    def frozen_forward():
        model.encode_image_base(images, normalize=True)
        model.encode_text_base(torch.cat([chosen, rejected]), normalize=True)

    po_step.text_positions = caption_span(torch.cat([chosen, rejected]))  # what the policy's text tower runs over
    po_step.context_length = model.context_length
    return po_step, (frozen_forward if mode == "head" else clip_step)


def _peak_rss_rise(which: str, steps: int, model_name: str, cached: bool = False) -> float:
    """MB by which the steps raise resident memory above what set-up left: the peak during the steps (VmHWM,
    reset after set-up through /proc/self/clear_refs) minus the RSS they start from. A peak over the process's
    lifetime would hide the steps behind set-up's own peak (building the cache runs the reference at batch 32)."""
    code = f"""
import gc, re, sys
sys.path.insert(0, {repr(str(__import__('pathlib').Path(__file__).parent))})
import bench_train as b
po, clip = b._setup("full", batch={MEMORY_BATCH}, model_name={model_name!r}, cached={cached!r})
step = po if {which!r} == "po" else clip
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


DISTINCT = "distinct PO-length captions: SOT, 4–18 words, EOT, zero padding"
FULL_CONTEXT = "distinct captions filling the whole context"


def _captions_label(classes: int, full_context: bool) -> str:
    if full_context:
        return FULL_CONTEXT
    return f"{classes}-class template captions, PO-length" if classes else DISTINCT


def _step_rows(model_name: str, repeats: int) -> list[dict]:
    rows = []
    # (time goal, FLOP goal) per (mode, cached); the full-context row has no FLOP goal: 2B captions over the whole
    # context where CLIP encodes B is its structure, not a cost to cut
    goals = {("full", False): (1.35, None), ("lock_text", False): (1.25, None), ("head", False): (1.10, None),
             ("full", True): (1.40, 1.36), ("lock_text", True): (1.25, None)}
    labels = {"full": "PO step / CLIP step, full fine-tune",
              "lock_text": "PO step / CLIP step, --lock-text",
              "head": "PO step (linear head) / frozen-backbone forward"}
    cases = [(mode, 0, False, False) for mode in ("full", "lock_text", "head")] + [("full", CLASSES, False, False)] \
        + [("full", 0, True, False), ("full", 0, True, True), ("lock_text", 0, True, False)]
    for mode, classes, cached, full_context in cases:
        po, base = _setup(mode, model_name=model_name, class_captions=classes, cached=cached,
                          full_context=full_context)
        flop_ratio = count_flops(po) / count_flops(base)
        t_po, t_base = interleaved_medians(po, base, repeats)
        ratio = t_po / t_base
        goal, flop_goal = goals[(mode, cached)]
        flop_goal = None if full_context else flop_goal
        flop_text = f"FLOP ratio {flop_ratio:.2f}" + (f" (goal ≤ {flop_goal})" if flop_goal else "")
        if cached:  # nothing of the reference runs: what is left is the policy, the floor of a PO step
            if mode != "full":
                flop_text += " = the policy alone (the text tower frozen, no reference)"
            elif full_context:
                flop_text += (" = the policy alone encoding 2B captions over the whole context where CLIP encodes B: "
                              "the structural cost, which no caption span shortens")
            else:
                flop_text += (" = the policy alone, the floor of a PO step: its 2B captions run over their span, "
                              "CLIP's B over the whole context")
        context = f"text tower over {po.text_positions} positions (CLIP: all {po.context_length})" \
            if mode != "head" else f"text tower over {po.text_positions} positions in both"
        rows.append({"name": f"{labels[mode]}{', reference cache' if cached else ''} "
                             f"({_captions_label(classes, full_context)})", "value": ratio,
                     "unit": "×", "goal": f"≤ {goal}", "met": ratio <= goal and (flop_goal is None or
                                                                                 flop_ratio <= flop_goal),
                     "details": f"{flop_text}; {context}; {model_name}, batch {BATCH}, medians of {repeats}: "
                                f"{t_po * 1e3:.1f} ms vs {t_base * 1e3:.1f} ms"})
    return rows


def _under_autocast(step, precision: str):
    from open_clip_train.precision import get_autocast

    autocast = get_autocast(precision, device_type="cpu")

    def wrapped():
        with autocast():
            step()

    return wrapped


BF16_REFERENCE_NOTE = ("the online reference's attention runs the policy's GEMMs under autocast "
                       "(open_clip_po/towers/attention_layout.py; docs/training.md)")


def amp_bf16_row(model_name: str, repeats: int) -> dict:
    """PO / CLIP step ratio, full fine-tune, distinct PO-length captions, both under ``--precision amp_bf16``
    autocast."""
    po, clip = _setup("full", model_name=model_name)
    po_bf16, clip_bf16 = _under_autocast(po, "amp_bf16"), _under_autocast(clip, "amp_bf16")
    flop_ratio = count_flops(po_bf16) / count_flops(clip_bf16)
    t_po, t_clip = interleaved_medians(po_bf16, clip_bf16, repeats)
    ratio = t_po / t_clip
    return {"name": f"PO step / CLIP step, full fine-tune, amp_bf16 ({DISTINCT})", "value": ratio,
            "unit": "×", "goal": "≤ 1.35", "met": ratio <= 1.35,
            "details": f"FLOP ratio {flop_ratio:.2f}; text tower over {po.text_positions} positions (CLIP: all "
                       f"{po.context_length}); {model_name}, batch {BATCH}, bfloat16 autocast on CPU, medians of "
                       f"{repeats}: {t_po * 1e3:.1f} ms vs {t_clip * 1e3:.1f} ms; {BF16_REFERENCE_NOTE}"}


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
    rows = _step_rows(model_name, repeats)
    rows.insert(1, amp_bf16_row(model_name, repeats))  # beside the fp32 full fine-tune row
    rows.append(_precompute_row(model_name, 32 if quick else 64))
    rows += memory_rows(model_name)
    return rows


def memory_rows(model_name: str) -> list[dict]:
    """Peak-memory rise of two PO steps over two CLIP steps, without and with the reference cache. The CLIP
    baseline is the same computation in both rows; only PO's reference differs."""
    rows = []
    clip_mb = _peak_rss_rise("clip", 2, model_name)
    for cached in (False, True):
        po_mb = _peak_rss_rise("po", 2, model_name, cached)
        ratio = po_mb / clip_mb if clip_mb > 0 else float("nan")
        goal = 1.40 if cached else 1.30
        rows.append({"name": f"peak memory PO / CLIP (full fine-tune{', reference cache' if cached else ''})",
                     "value": ratio, "unit": "×", "goal": f"≤ {goal:.2f}", "met": ratio <= goal,
                     "details": f"rise of peak RSS during 2 steps over the RSS they start from: {po_mb:.0f} MB vs "
                                f"{clip_mb:.0f} MB ({model_name}, batch {MEMORY_BATCH}"
                                f"{'; no reference model in memory' if cached else ''})"})
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
