"""One PO step's losses (paper Algorithm 1/2): policy and reference features, L_pref + λ L_reg.

``POCriterion`` is what ``open_clip_po.main`` hands open_clip's trainer in place of its contrastive loss: it
holds the objective (any registered one, or a weighted mixture), the reference strategy and the settings, and
maps a batch (see docs/interfaces.md) to ``{"loss": total, <detached metrics>}``.

One policy forward per step: the pref images and the reg images go through the image tower together, and
y_w, y_l, the reg captions and (with ``--po-candidates classes``) the class prompts through the text tower
together — DDP sees exactly one forward before each backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

import torch.nn.functional as F

from . import losses as po_losses
from .head import get_linear_head
from .reference import Features


@dataclass
class POSettings:
    reg_lambda: float = 1.0
    reg_direction: str = "forward"
    candidates: str = "batch"  # "batch": the global batch's captions; "classes": one prompt per class
    kto_kl: str = "mismatched"  # KTO's reference point z: "mismatched" pairs (TRL) or "exact" KL
    distributed: bool = False
    # μ: the same KL for the reversed head W⁻¹ = W_{−1} of a log-parameterised head (see reversed_head_kl)
    head_reverse_lambda: float = 0.0


class StepText(NamedTuple):
    """One model's text features of a step, split by role."""
    chosen: torch.Tensor      # y_w, [B, D]
    rejected: torch.Tensor    # y_l, [B, D]
    reg: torch.Tensor         # D_reg captions, [B_reg, D] (empty without a regulariser)
    prompts: torch.Tensor     # class prompts, [C, D] (empty unless --po-candidates classes)

    @classmethod
    def split(cls, text: torch.Tensor, n_pref: int, n_reg: int) -> "StepText":
        chosen, rejected, reg, prompts = text.split([n_pref, n_pref, n_reg, text.shape[0] - 2 * n_pref - n_reg])
        return cls(chosen, rejected, reg, prompts)


def match_prompts(tokens: torch.Tensor, prompt_tokens: torch.Tensor, what: str) -> torch.Tensor:
    """Index of each caption among the class prompts, by exact token match (same tokenizer, same template)."""
    equal = (tokens[:, None, :] == prompt_tokens[None, :, :]).all(-1)  # [B, C]
    found = equal.any(-1)
    if not bool(found.all()):
        raise ValueError(f"--po-candidates classes: {int((~found).sum())} {what} caption(s) in the batch are not "
                         f"one of the class prompts (check --po-classnames/--po-template against the shards)")
    return equal.float().argmax(-1)


def features_of_distinct_captions(reference, model, images, texts, need_reference: bool, keys=None):
    """``reference.step_features`` with each distinct caption encoded once and its features shared by index.

    Captions repeat within a batch (class templates: y_w of one image is y_l of another) — exact, gradients
    included.
    """
    unique, inverse = torch.unique(texts, dim=0, return_inverse=True)
    policy, ref = reference.step_features(model, images, unique, need_reference, keys)
    policy = policy._replace(text=policy.text[inverse])
    return policy, (None if ref is None else ref._replace(text=ref.text[inverse]))


class POCriterion(nn.Module):
    def __init__(self, objective: nn.Module, reference, settings: POSettings,
                 prompt_tokens: torch.Tensor | None = None):
        super().__init__()
        self.objective, self.reference, self.settings = objective, reference, settings
        if settings.candidates == "classes" and prompt_tokens is None:
            raise ValueError("--po-candidates classes needs --po-classnames")
        self.prompt_tokens = prompt_tokens
        self.needs_reference_features = (objective.requires_reference or settings.reg_lambda > 0
                                         or settings.head_reverse_lambda > 0)

    def _pair_logps(self, features: Features, text: StepText, n_pref: int, index: dict | None):
        image = features.image[:n_pref]
        if index is not None:
            return po_losses.pair_logps(image, None, None, features.scale, candidates=text.prompts, **index)
        return po_losses.pair_logps(image, text.chosen, text.rejected, features.scale,
                                    gather=self.settings.distributed)

    def _kl_inputs(self, policy_matrix, ref_matrix, index: dict | None) -> dict:
        """KTO's reference point: the exact KL over the candidates, or TRL's mismatched pairs."""
        if not getattr(self.objective, "needs_kl", False):
            return {}
        if self.settings.kto_kl == "exact":
            return {"kl": po_losses.kto_reference_point_exact(policy_matrix, ref_matrix)}
        chosen_index = None if index is None else index["chosen_index"]
        policy_kl, ref_kl = po_losses.kto_kl_logps(policy_matrix, ref_matrix, chosen_index=chosen_index)
        return {"policy_kl_logps": policy_kl, "ref_kl_logps": ref_kl}

    def forward(self, model, batch: dict) -> dict:
        images, chosen, rejected = batch["images"], batch["chosen"], batch["rejected"]
        reg_images, reg_texts = batch.get("reg_images"), batch.get("reg_texts")
        use_reg = reg_images is not None and max(self.settings.reg_lambda, self.settings.head_reverse_lambda) > 0
        n_pref, n_reg = images.shape[0], (reg_texts.shape[0] if use_reg else 0)

        text_parts = [chosen, rejected] + ([reg_texts] if use_reg else [])
        index = None
        if self.settings.candidates == "classes":
            prompts = self.prompt_tokens.to(chosen.device)
            text_parts.append(prompts)
            index = dict(chosen_index=match_prompts(chosen, prompts, "y_w"),
                         rejected_index=match_prompts(rejected, prompts, "y_l"))
        all_images = torch.cat([images, reg_images]) if use_reg else images
        keys = batch.get("keys")
        if keys is not None and use_reg:
            keys = list(keys) + list(batch.get("reg_keys") or [])
        policy, ref = features_of_distinct_captions(self.reference, model, all_images, torch.cat(text_parts),
                                                    self.needs_reference_features, keys)
        p_text = StepText.split(policy.text, n_pref, n_reg)
        pc, pr, p_matrix = self._pair_logps(policy, p_text, n_pref, index)

        ref_logps, extra = (None, None), {}
        if ref is not None:
            ref = ref.detach()
            r_text = StepText.split(ref.text, n_pref, n_reg)
            rc, rr, r_matrix = self._pair_logps(ref, r_text, n_pref, index)
            extra = self._kl_inputs(p_matrix, r_matrix, index)
            if self.objective.requires_reference:
                ref_logps = (rc, rr)
        out = self.objective(pc, pr, *ref_logps, **extra)
        metrics = {k: v.detach() for k, v in out.items() if k != "loss"}
        metrics["pref_loss"] = out["loss"].detach()

        reg = torch.zeros((), device=out["loss"].device)
        if use_reg:
            reg = po_losses.kl_regulariser(policy.image[n_pref:], p_text.reg, ref.image[n_pref:], r_text.reg,
                                           policy.scale, ref.scale, direction=self.settings.reg_direction,
                                           gather=self.settings.distributed)
            metrics["reg_kl"] = reg.detach()
        total = po_losses.total_loss(out["loss"], reg, self.settings.reg_lambda if use_reg else 0.0)
        if use_reg and self.settings.head_reverse_lambda > 0:
            reversed_kl = self.reversed_head_kl(model, ref, r_text.reg, n_pref, policy.scale)
            metrics["reg_kl_reversed"] = reversed_kl.detach()
            total = total + self.settings.head_reverse_lambda * reversed_kl
        return {"loss": total, "logit_scale": policy.scale.detach(), **metrics}

    def reversed_head_kl(self, model, ref: Features, ref_reg_text: torch.Tensor, n_pref: int, scale) -> torch.Tensor:
        """``E_{x∈D_reg} KL(π_{W_{−1}}(·|x) ‖ π_ref(·|x))``: Eq. 11 for the head turned around (t = −1).

        The KL term holds the trained head W_1 near the reference; this one holds W_{−1} (exp(−A) for a log head,
        2I − W for a dense image head; ``LinearHead.reversed_weight``) there too, so the knob W_t moves the model by
        about as much either way and t < 0 undoes what the head learned instead of wrecking the features. W_{−1}
        acts on the reference's normalised features as on the raw ones: normalise(M f / |f|) = normalise(M f)."""
        head = get_linear_head(model)
        inverse = head.reversed_weight()
        image = F.normalize(ref.image[n_pref:] @ inverse.T.to(ref.image.dtype), dim=-1)
        text = F.normalize(ref_reg_text @ inverse.T.to(ref_reg_text.dtype), dim=-1) if head.towers == "both" \
            else ref_reg_text
        return po_losses.kl_regulariser(image, text, ref.image[n_pref:], ref_reg_text, scale, ref.scale,
                                        direction=self.settings.reg_direction, gather=self.settings.distributed)
