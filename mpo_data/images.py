"""Image paths resolved safely under an image root, and decoded under a pixel limit."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# 64 megapixels: far above any VLM tile budget, far below what a decompression bomb expands to.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that must not or cannot be used; the message says why, `category` groups it for counts."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


def resolve(root: str | Path, rel: str) -> Path:
    """The file `rel` names under `root`; refuses absolute paths, `..` and symlinks that leave the root."""
    if os.path.isabs(rel):
        raise ImageError("image outside root", f"image path '{rel}' is absolute; paths must be relative to the image root")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImageError("image outside root", f"image path '{rel}' resolves outside the image root {root}")
    if not os.path.isfile(real):
        raise ImageError("image missing", f"image '{rel}' not found under {root}")
    return Path(real)


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    max_pixels = max_pixels or MAX_PIXELS
    try:
        image = Image.open(path)  # reads the header only
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError("image unreadable", f"image '{path}' is unreadable: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError("image oversized", f"image '{path}' is {width}x{height}, over the {max_pixels:,}-pixel limit")
    return image


def check(root: str | Path, rel: str, max_pixels: int | None = None, verify: bool = True) -> None:
    """Raise ImageError if `rel` is out of root, missing, unreadable or oversized; decodes nothing big.

    verify=False reads the header only (the stages: their engine workers decode, and report failures there).
    """
    path = resolve(root, rel)
    with _open_checked(path, max_pixels) as image:
        if not verify:
            return
        try:
            image.verify()
        except Exception as e:  # PIL raises many types for corrupt data
            raise ImageError("image unreadable", f"image '{rel}' is corrupt: {e}") from None


def load(root: str | Path, rel: str, max_pixels: int | None = None) -> Image.Image:
    """Decode one image as RGB, after the same checks as `check`."""
    path = resolve(root, rel)
    with _open_checked(path, max_pixels) as image:
        try:
            return image.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise ImageError("image unreadable", f"image '{rel}' cannot be decoded: {e}") from None
