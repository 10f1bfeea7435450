"""PO objectives on features, measured in one run against open_clip's ClipLoss.

- speed: one PO loss step on given features — policy and reference log-probs over the batch's 2B
  captions, DPO (or KTO with its exact z), the KL regulariser on a D_reg batch of B, backward — against
  open_clip's ClipLoss (B x B, both directions) + backward on the same features;
- speed of every other objective (TRL's loss types, SimPO, ORPO, a dpo,ce mixture): policy and reference
  log-probs, the objective, backward — no regulariser — against the same ClipLoss step;
- float32 accuracy: DPO / KTO / KL regulariser in float32 vs float64 on the same inputs at s = 100.
"""
from __future__ import annotations

from _timing import median_seconds


def _features(batch: int, dim: int, dtype):
    import torch

    g = torch.Generator().manual_seed(0)

    def unit(n):
        x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        return (x / x.norm(dim=-1, keepdim=True)).to(dtype)

    policy = [unit(batch) for _ in range(5)]  # image, y_w, y_l, reg image, reg text
    ref = [(p + 0.05 * unit(batch)).to(dtype) for p in policy]
    ref = [r / r.norm(dim=-1, keepdim=True) for r in ref]
    return policy, ref


def _po_step(policy, ref, scale, loss_fn):
    from open_clip_po import losses as L

    leaves = [p.clone().requires_grad_() for p in policy]
    img, tw, tl, reg_img, reg_txt = leaves
    pc, pr, pm = L.pair_logps(img, tw, tl, scale)
    rc, rr, rm = L.pair_logps(ref[0], ref[1], ref[2], scale)
    extra = {"kl": L.kto_reference_point_exact(pm, rm)} if loss_fn.needs_kl else {}
    out = loss_fn(pc, pr, rc, rr, **extra)
    loss = L.total_loss(out["loss"], L.kl_regulariser(reg_img, reg_txt, ref[3], ref[4], scale, scale), 1.0)
    loss.backward()
    return loss.detach()


# Objectives timed without the regulariser: every built-in beyond the dpo/kto rows above, and a mixture.
OBJECTIVE_ROWS = ("dpo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_pair", "apo_zero", "apo_down",
                  "discopop", "dpo:js_divergence", "dpo:alpha_divergence", "simpo", "orpo", "dpo,ce")


def _objective(spec: str):
    from open_clip_po.losses import build_objective

    name, _, fdiv = spec.partition(":")
    if fdiv:
        return build_objective(name, None, {"f_divergence_type": fdiv})
    return build_objective(spec, [1.0, 0.1] if "," in spec else None, {})


def _objective_step(policy, ref, scale, loss_fn):
    import torch

    from open_clip_po import losses as L

    img, tw, tl = (p.clone().requires_grad_() for p in policy[:3])
    pc, pr, _ = L.pair_logps(img, tw, tl, scale)
    with torch.no_grad():
        rc, rr, _ = L.pair_logps(ref[0], ref[1], ref[2], scale)
    loss_fn(pc, pr, rc, rr)["loss"].backward()


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, called in turn within every repeat (after one warm-up round), so a
    change of machine load during the run affects them alike."""
    import statistics
    import time

    times = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, sink in zip(fns, times):
            start = time.perf_counter()
            fn()
            if round_:
                sink.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def objective_rows(policy, ref, scale, clip_step, batch, dim, repeats) -> list[dict]:
    rows = []
    for spec in OBJECTIVE_ROWS:
        loss_fn = _objective(spec)
        t_clip, t = interleaved_medians([clip_step, lambda: _objective_step(policy, ref, scale, loss_fn)], repeats)
        rows.append({
            "name": f"{spec} step / ClipLoss step (features given)",
            "value": t / t_clip, "unit": "x", "goal": "<= 2.5", "met": t / t_clip <= 2.5,
            "details": f"B={batch}, D={dim}, float32, 1 thread, {repeats} interleaved repeats; medians "
                       f"{t * 1e3:.2f} ms vs {t_clip * 1e3:.2f} ms (policy + reference log-probs over 2B "
                       "captions, objective, backward)"})
    return rows


def run(quick: bool) -> list[dict]:
    import torch
    from open_clip.loss import ClipLoss

    from open_clip_po.losses import get_loss

    torch.set_num_threads(1)
    batch, dim, repeats = (128, 256, 5) if quick else (512, 512, 20)
    policy, ref = _features(batch, dim, torch.float32)
    scale = torch.tensor(100.0)
    clip_loss = ClipLoss()

    def clip_step():
        img, txt = (p.clone().requires_grad_() for p in policy[:2])
        clip_loss(img, txt, scale).backward()

    rows = []
    t_clip = median_seconds(clip_step, repeats)
    objectives = {name: get_loss(name) for name in ("dpo", "kto")}
    for name, loss_fn in objectives.items():
        t_po = median_seconds(lambda: _po_step(policy, ref, scale, loss_fn), repeats)
        rows.append({
            "name": f"{name} + KL regulariser step / ClipLoss step (features given)",
            "value": t_po / t_clip, "unit": "x", "goal": "<= 6", "met": t_po / t_clip <= 6,
            "details": f"B={batch}, D={dim}, float32, 1 thread, {repeats} repeats; medians "
                       f"{t_po * 1e3:.2f} ms vs {t_clip * 1e3:.2f} ms (PO does ~4x the matmul work: policy and "
                       "reference over 2B captions, KL over B, backward)"})

    rows += objective_rows(policy, ref, scale, clip_step, batch, dim, repeats)

    p64, r64 = _features(batch, dim, torch.float64)
    s64 = torch.tensor(100.0, dtype=torch.float64)
    for name, loss_fn in objectives.items():
        exact = _po_step(p64, r64, s64, loss_fn).item()
        single = _po_step([p.float() for p in p64], [r.float() for r in r64], scale, loss_fn).item()
        rel = abs(single - exact) / abs(exact)
        rows.append({"name": f"{name} + KL regulariser, float32 vs float64 relative error at s=100",
                     "value": rel, "unit": "", "goal": "<= 1e-4", "met": rel <= 1e-4,
                     "details": f"B={batch}, D={dim}; float64 loss {exact:.6g}"})
    return rows


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
