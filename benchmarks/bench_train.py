"""PO step vs open_clip CLIP step on the same model and inputs (issue 5), measured in one run.

- full fine-tune: POCriterion (policy on B images + 2B captions, frozen reference forward, DPO) + backward +
  AdamW step, against open_clip's ClipLoss on B images + B captions + backward + step; with distinct captions
  the reference's text memo starts empty every step (they would not repeat in real data), with class-template
  captions it is warm (they do);
- ``--lock-text``: both with the text tower locked (the reference then shares the policy's text features);
- linear head: a PO step training only W, against a forward of the frozen backbone on the same inputs;
- ``amp_bf16``: the full fine-tune pair again, both steps under open_clip's ``--precision amp_bf16`` autocast
  (bfloat16 on CPU), beside the fp32 row;
- peak memory: the rise of the process's peak RSS over its post-setup level, PO vs CLIP, each in a fresh
  subprocess (on GPU one would read torch.cuda.max_memory_allocated; this machine has none).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

from _timing import median_seconds

MODEL, BATCH = "ViT-B-32", 8  # a real architecture (random weights, nothing downloaded)
QUICK_MODEL = "po-tiny"
CLASSES = 10  # e.g. a 10-class typographic set: y_w / y_l are "a photo of a {class}."
MEMORY_BATCH = 32  # large enough that activations, not model set-up, set the peak


def _setup(mode: str, batch: int = BATCH, model_name: str = MODEL, class_captions: int = 0):
    import torch

    import open_clip
    import open_clip_po  # noqa: F401
    from open_clip_po.criterion import POCriterion, POSettings
    from open_clip_po.head import attach_linear_head
    from open_clip_po.losses import get_loss
    from open_clip_po.reference import Reference

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size)
    chosen, rejected = torch.randint(1, 5000, (2, batch, model.context_length))
    if class_captions:  # typographic data: y_w and y_l are class templates, so captions repeat in a batch
        prompts = torch.randint(1, 5000, (class_captions, model.context_length))
        chosen, rejected = prompts[torch.randint(class_captions, (2, batch))]
    reference = Reference.copy_of(model, shares_text=(mode == "lock_text"))
    if mode == "lock_text":
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if mode == "head":
        model.requires_grad_(False)
        attach_linear_head(model).requires_grad_(True)
        reference = Reference(None, is_base_of_head=True)
    criterion = POCriterion(get_loss("dpo"), reference, POSettings(reg_lambda=0.0))
    clip_loss = open_clip.ClipLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = {"images": images, "chosen": chosen, "rejected": rejected}

    def po_step():
        if not class_captions and reference.model is not None:
            # Distinct captions never come back in real data: the reference's text memo must not help here.
            reference.text_cache.clear()
        out = criterion(model, batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()

    def clip_step():
        out = model(images, chosen)
        clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        opt.step()
        opt.zero_grad()

    @torch.no_grad()
    def frozen_forward():
        model.encode_image_base(images, normalize=True)
        model.encode_text_base(torch.cat([chosen, rejected]), normalize=True)

    return po_step, (frozen_forward if mode == "head" else clip_step)


def _interleaved(a, b, repeats):
    """Alternate the two so that load from elsewhere on the machine hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(median_seconds(a, 1))
        tb.append(median_seconds(b, 1))
    return statistics.median(ta), statistics.median(tb)


def _peak_rss_rise(which: str, steps: int, model_name: str) -> float:
    code = f"""
import resource, sys
sys.path.insert(0, {repr(str(__import__('pathlib').Path(__file__).parent))})
import bench_train as b
po, clip = b._setup("full", batch={MEMORY_BATCH}, model_name={model_name!r})
step = po if {which!r} == "po" else clip
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range({steps}):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _under_autocast(step, precision: str):
    from open_clip_train.precision import get_autocast

    autocast = get_autocast(precision, device_type="cpu")

    def wrapped():
        with autocast():
            step()

    return wrapped


def amp_bf16_row(model_name: str, repeats: int) -> dict:
    """PO / CLIP step ratio, full fine-tune, distinct captions, both under ``--precision amp_bf16`` autocast."""
    po, clip = _setup("full", model_name=model_name)
    t_po, t_clip = _interleaved(_under_autocast(po, "amp_bf16"), _under_autocast(clip, "amp_bf16"), repeats)
    ratio = t_po / t_clip
    return {"name": "PO step / CLIP step, full fine-tune, amp_bf16 (all captions distinct)", "value": ratio,
            "unit": "×", "goal": "≤ 1.35", "met": ratio <= 1.35,
            "details": f"{model_name}, batch {BATCH}, bfloat16 autocast on CPU, medians of {repeats}: "
                       f"{t_po * 1e3:.1f} ms vs {t_clip * 1e3:.1f} ms"}


def run(quick: bool = False) -> list[dict]:
    repeats, model_name = (3, QUICK_MODEL) if quick else (5, MODEL)
    rows = []
    goals = {"full": 1.35, "lock_text": 1.25, "head": 1.10}
    labels = {"full": "PO step / CLIP step, full fine-tune",
              "lock_text": "PO step / CLIP step, --lock-text",
              "head": "PO step (linear head) / frozen-backbone forward"}
    cases = [(mode, 0) for mode in ("full", "lock_text", "head")] + [("full", CLASSES)]
    for mode, classes in cases:
        po, base = _setup(mode, model_name=model_name, class_captions=classes)
        t_po, t_base = _interleaved(po, base, repeats)
        ratio = t_po / t_base
        captions = f"{classes}-class template captions" if classes else "all captions distinct"
        rows.append({"name": f"{labels[mode]} ({captions})", "value": ratio, "unit": "×", "goal": f"≤ {goals[mode]}",
                     "met": ratio <= goals[mode],
                     "details": f"{model_name}, batch {BATCH}, medians of {repeats}: {t_po * 1e3:.1f} ms vs "
                                f"{t_base * 1e3:.1f} ms"})
    rows.insert(1, amp_bf16_row(model_name, repeats))  # beside the fp32 full fine-tune row
    po_mb, clip_mb = _peak_rss_rise("po", 2, model_name), _peak_rss_rise("clip", 2, model_name)
    ratio = po_mb / clip_mb if clip_mb > 0 else float("nan")
    rows.append({"name": "peak memory PO / CLIP (full fine-tune)", "value": ratio, "unit": "×", "goal": "≤ 1.30",
                 "met": ratio <= 1.30,
                 "details": f"rise of peak RSS over setup: {po_mb:.0f} MB vs {clip_mb:.0f} MB "
                            f"({model_name}, batch {MEMORY_BATCH})"})
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
