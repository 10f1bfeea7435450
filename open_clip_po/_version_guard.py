"""Fail early, in one line, when the installed open_clip is outside the range we patch."""
from importlib import metadata

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
