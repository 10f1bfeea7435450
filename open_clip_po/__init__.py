"""Preference optimisation (DPO, IPO, KTO, ...) for open_clip models.

Importing the package checks the open_clip version and registers the tiny model
configs shipped in ``model_configs/`` (``po-tiny``, ``po-small``) with open_clip.
"""
from pathlib import Path

from ._version_guard import check_open_clip_version

__version__ = "0.1.0"
OPEN_CLIP_VERSION = check_open_clip_version()

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> list[str]:
    """Register our JSON configs with open_clip (idempotent); return their names."""
    import open_clip
    from open_clip import factory

    if MODEL_CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


MODEL_NAMES = register_model_configs()
