"""A frozen model's forward under bf16 autocast, with its self-attention laid out as the policy's forward lays it
out (``open_clip_po.towers.attention_layout``: what the online reference, the reference-cache builder and linear-head
mode's frozen backbone run) against plain open_clip on the same weights and inputs, measured in one run.

Both do the same arithmetic (the FLOP ratio, counted with ``FlopCounterMode``, is the limit: 1.00); plain open_clip
without grad expands each attention in-projection weight L times before a batched GEMM, which is the time it
loses.
"""
from __future__ import annotations

import copy

from _timing import count_flops, interleaved_medians

MODEL, BATCH, CAPTIONS = "ViT-B-32", 8, 16  # a real architecture (random weights, nothing downloaded)
QUICK_MODEL = "po-tiny"


def _forward(model, images, texts):
    import torch

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.encode_image(images)
            model.encode_text(texts)
    return run


def run(quick: bool = False) -> list[dict]:
    import torch

    import open_clip
    from open_clip_po.towers.attention_layout import contiguous_attention_under_autocast

    model_name, repeats = (QUICK_MODEL, 3) if quick else (MODEL, 5)
    torch.manual_seed(0)
    plain = open_clip.create_model(model_name).eval().requires_grad_(False)
    laid_out = copy.deepcopy(plain)
    contiguous_attention_under_autocast(laid_out)
    size = plain.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(BATCH, 3, size, size)
    texts = torch.randint(1, plain.vocab_size - 1, (CAPTIONS, plain.context_length))
    a, b = _forward(plain, images, texts), _forward(laid_out, images, texts)
    t_plain, t_laid = interleaved_medians(a, b, repeats)
    ratio = t_laid / t_plain
    flop_ratio = count_flops(b) / count_flops(a)
    return [{"name": "frozen forward under bf16 autocast, attention laid out / plain open_clip", "value": ratio,
             "unit": "×", "goal": "≤ 1.0", "met": ratio <= 1.0,
             "details": f"FLOP ratio {flop_ratio:.2f} (the limit: the same arithmetic); {model_name}, {BATCH} images "
                        f"+ {CAPTIONS} captions, no grad, medians of {repeats}: {t_laid * 1e3:.0f} ms vs "
                        f"{t_plain * 1e3:.0f} ms"}]
