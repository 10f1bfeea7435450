"""Preference optimisation (DPO, IPO, KTO, ...) for open_clip models.

Importing the package checks the open_clip version (one line, early, outside the range the trainer's seam knows)
and registers the tiny model configs shipped in ``model_configs/`` (``po-tiny``, ``po-small``) with open_clip.
"""
from importlib import metadata
from pathlib import Path

__version__ = "0.1.0"

SUPPORTED = ((3, 1), (4, 0))  # >= 3.1, < 4: 4.x rewrites the training loop our seam hooks into


class UnsupportedOpenClipVersion(ImportError):
    pass


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_open_clip_version(version: str | None = None) -> str:
    if version is None:
        try:
            version = metadata.version("open_clip_torch")
        except metadata.PackageNotFoundError as e:
            raise UnsupportedOpenClipVersion(
                "open_clip_po needs open_clip_torch>=3.1,<4, which is not installed") from e
    low, high = SUPPORTED
    if not (low <= _parse(version)[:2] < high):
        raise UnsupportedOpenClipVersion(
            f"open_clip_po supports open_clip_torch>=3.1,<4; found {version}")
    return version


OPEN_CLIP_VERSION = check_open_clip_version()

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> list[str]:
    """Register our JSON configs with open_clip (idempotent); return their names."""
    import open_clip  # after the version check, so an unsupported open_clip fails with its one line
    from open_clip import factory

    if MODEL_CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


MODEL_NAMES = register_model_configs()
