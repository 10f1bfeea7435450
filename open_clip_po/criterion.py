"""One PO step's losses (paper Algorithm 1/2): policy and reference features, L_pref + λ L_reg.

``POCriterion`` is what ``open_clip_po.main`` hands open_clip's trainer in place of its contrastive loss: it
holds the objective (any registered one), the frozen reference and the settings, and maps a batch
(see docs/interfaces.md) to ``{"loss": total, <detached metrics>}``.

One policy forward per step: the pref images and the reg images go through the image tower together, and
y_w, y_l, the reg captions and (with ``--po-candidates classes``) the class prompts through the text tower
together — DDP sees exactly one forward before each backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as po_losses
from .head import get_linear_head, has_linear_head
from .reference import Reference


@dataclass
class POSettings:
    reg_lambda: float = 1.0
    reg_direction: str = "forward"
    candidates: str = "batch"  # "batch": the global batch's captions; "classes": one prompt per class
    kto_kl: str = "mismatched"  # KTO's reference point z: "mismatched" pairs (TRL) or "exact" KL
    distributed: bool = False


def match_prompts(tokens: torch.Tensor, prompt_tokens: torch.Tensor, what: str) -> torch.Tensor:
    """Index of each caption among the class prompts, by exact token match (same tokenizer, same template)."""
    equal = (tokens[:, None, :] == prompt_tokens[None, :, :]).all(-1)  # [B, C]
    found = equal.any(-1)
    if not bool(found.all()):
        raise ValueError(f"--po-candidates classes: {int((~found).sum())} {what} caption(s) in the batch are not "
                         f"one of the class prompts (check --po-classnames/--po-template against the shards)")
    return equal.float().argmax(-1)


class POCriterion(nn.Module):
    def __init__(self, objective: nn.Module, reference: Reference, settings: POSettings,
                 prompt_tokens: torch.Tensor | None = None):
        super().__init__()
        self.objective, self.reference, self.settings = objective, reference, settings
        if settings.candidates == "classes" and prompt_tokens is None:
            raise ValueError("--po-candidates classes needs --po-classnames")
        self.prompt_tokens = prompt_tokens
        self.needs_reference_features = objective.requires_reference or settings.reg_lambda > 0

    # --- features -------------------------------------------------------------------------------------------
    def _features(self, model, images, texts):
        """(policy image, policy text, policy scale, ref image, ref text, ref scale); ref parts are detached.

        Captions repeat within a batch (class templates: y_w of one image is y_l of another), so each distinct
        caption is encoded once and its features shared by index — exact, gradients included.
        """
        unique, inverse = torch.unique(texts, dim=0, return_inverse=True)
        p_img, p_txt, p_scale, r_img, r_txt, r_scale = self._features_of_unique(model, images, unique)
        return p_img, p_txt[inverse], p_scale, r_img, r_txt[inverse], r_scale

    def _features_of_unique(self, model, images, texts):
        core = getattr(model, "module", model)
        if has_linear_head(core) and self.reference.is_base_of_head:
            # Linear-head mode: one frozen backbone pass serves both; only W sees gradients.
            with torch.no_grad():
                base_image = core.encode_image_base(images, normalize=False)
                base_text = core.encode_text_base(texts, normalize=False)
            head = get_linear_head(core)
            scale = core.logit_scale.exp()
            policy = (F.normalize(head(base_image), dim=-1), F.normalize(head(base_text), dim=-1), scale)
            ref = (F.normalize(base_image, dim=-1), F.normalize(base_text, dim=-1), scale.detach())
            return (*policy, *ref)
        out = model(images, texts)
        policy = (out["image_features"], out["text_features"], out["logit_scale"])
        if not self.needs_reference_features:
            # Reference-free objective and no regulariser: stand-ins that no loss reads.
            return (*policy, policy[0].detach(), policy[1].detach(), policy[2].detach())
        ref = self.reference.features(images, texts, policy_text_features=policy[1])
        return (*policy, *ref)

    # --- the step -------------------------------------------------------------------------------------------
    def forward(self, model, batch: dict) -> dict:
        images, chosen, rejected = batch["images"], batch["chosen"], batch["rejected"]
        reg_images, reg_texts = batch.get("reg_images"), batch.get("reg_texts")
        use_reg = reg_images is not None and self.settings.reg_lambda > 0
        n_pref, n_reg_text = images.shape[0], (reg_texts.shape[0] if use_reg else 0)

        text_parts = [chosen, rejected] + ([reg_texts] if use_reg else [])
        if self.settings.candidates == "classes":
            prompts = self.prompt_tokens.to(chosen.device)
            text_parts.append(prompts)
        all_images = torch.cat([images, reg_images]) if use_reg else images
        p_img, p_txt, p_scale, r_img, r_txt, r_scale = self._features(model, all_images, torch.cat(text_parts))

        def split(text):
            tw, tl = text[:n_pref], text[n_pref:2 * n_pref]
            reg = text[2 * n_pref:2 * n_pref + n_reg_text]
            cand = text[2 * n_pref + n_reg_text:]
            return tw, tl, reg, cand

        p_tw, p_tl, p_reg_t, p_cand = split(p_txt)
        r_tw, r_tl, r_reg_t, r_cand = split(r_txt)
        p_img_pref, r_img_pref = p_img[:n_pref], r_img[:n_pref]

        gather = self.settings.distributed
        if self.settings.candidates == "classes":
            index = dict(chosen_index=match_prompts(chosen, prompts, "y_w"),
                         rejected_index=match_prompts(rejected, prompts, "y_l"))
            pc, pr, p_matrix = po_losses.pair_logps(p_img_pref, None, None, p_scale, candidates=p_cand, **index)
            rc, rr, r_matrix = po_losses.pair_logps(r_img_pref, None, None, r_scale, candidates=r_cand, **index)
        else:
            pc, pr, p_matrix = po_losses.pair_logps(p_img_pref, p_tw, p_tl, p_scale, gather=gather)
            rc, rr, r_matrix = po_losses.pair_logps(r_img_pref, r_tw, r_tl, r_scale, gather=gather)

        extra = {}
        if getattr(self.objective, "needs_kl", False):
            if self.settings.kto_kl == "exact":
                extra["kl"] = po_losses.kto_reference_point_exact(p_matrix, r_matrix)
            else:
                chosen_index = index["chosen_index"] if self.settings.candidates == "classes" else None
                extra["policy_kl_logps"], extra["ref_kl_logps"] = po_losses.kto_kl_logps(
                    p_matrix, r_matrix, chosen_index=chosen_index)
        if self.objective.requires_reference:
            rc, rr = rc.detach(), rr.detach()
        else:
            rc = rr = None
        out = self.objective(pc, pr, rc, rr, **extra)
        metrics = {k: v.detach() for k, v in out.items() if k != "loss"}
        metrics["pref_loss"] = out["loss"].detach()

        reg = torch.zeros((), device=out["loss"].device)
        if use_reg:
            reg = po_losses.kl_regulariser(p_img[n_pref:], p_reg_t, r_img[n_pref:], r_reg_t, p_scale, r_scale,
                                           direction=self.settings.reg_direction, gather=gather)
            metrics["reg_kl"] = reg.detach()
        total = po_losses.total_loss(out["loss"], reg, self.settings.reg_lambda if use_reg else 0.0)
        return {"loss": total, "logit_scale": p_scale.detach(), **metrics}
