"""Zero-shot prompt templates per dataset family.

The single-template families follow Defense-Prefix's evaluation (the paper's Table 1/2 protocol);
``imagenet`` is CLIP's 80-template ensemble as shipped by open_clip.
"""
from __future__ import annotations

from typing import Sequence

from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from .errors import EvalError

TEMPLATE_FAMILIES: dict[str, tuple[str, ...]] = {
    "generic": ("a photo of a {}.",),
    "pets": ("a photo of a {}, a type of pet.",),
    "flowers": ("a photo of a {}, a type of flower.",),
    "food": ("a photo of a {}, a type of food.",),
    "aircraft": ("a photo of a {}, a type of aircraft.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of a {}.",),
    "imagenet": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    "imagenet-simple": tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES),
}
DEFAULT_FAMILY = "generic"


def resolve_templates(templates: Sequence[str] | None = None, family: str | None = None) -> list[str]:
    """Explicit ``templates`` win; else the ``family``'s; else ``generic``. Each must hold one ``{}``."""
    if templates:
        if family:
            raise EvalError("give either --template or --templates-for, not both")
        chosen = list(templates)
    else:
        family = family or DEFAULT_FAMILY
        if family not in TEMPLATE_FAMILIES:
            raise EvalError(f"unknown template family {family!r}; choose from {', '.join(TEMPLATE_FAMILIES)}")
        chosen = list(TEMPLATE_FAMILIES[family])
    for template in chosen:
        if template.count("{}") != 1:
            raise EvalError(f"template {template!r} must contain exactly one '{{}}' for the class name")
    return chosen
