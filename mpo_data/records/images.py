"""Image paths resolved safely under an image root, checked, and decoded into the RGB a VLM is shown.

What each kind of image becomes (one rule for validate, the stages, the report and training):
  refused  zero bytes ("image empty"); not an image, whatever the extension says ("image unreadable");
           truncated or corrupt data ("image corrupt"); over MAX_PIXELS, decompression bombs included,
           decided from the header before decoding ("image oversized"); a long side over MAX_ASPECT
           times the short one ("image aspect ratio"); float pixels ("image mode unsupported").
  converted  CMYK, 1-bit, grey, YCbCr -> RGB; 16-bit grey -> 8-bit by its top byte (PIL's own convert
           clips it to white); alpha or palette transparency -> composited on white (as transformers'
           `convert_to_rgb`; dropping alpha turns transparent areas black); EXIF orientation applied,
           so the model sees the picture upright as a viewer shows it; an animation -> its first frame.
  A PNG named .jpg is an image: PIL, and every VLM loader, decode by content, not by extension.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# 64 megapixels: far above any VLM tile budget, far below what a decompression bomb expands to.
MAX_PIXELS = 64_000_000
# Qwen2-VL's processor refuses images whose sides differ more than 200-fold; nothing useful is thinner.
MAX_ASPECT = 200
SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
WITH_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageError(ValueError):
    """An image that must not or cannot be used; the message says why, `category` groups it for counts."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


def resolve(root: str | Path, rel: str) -> Path:
    """The file `rel` names under `root`; refuses absolute paths, `..` and symlinks that leave the root."""
    if os.path.isabs(rel):
        raise ImageError(
            "image outside root", f"image path '{rel}' is absolute; paths must be relative to the image root"
        )
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImageError("image outside root", f"image path '{rel}' resolves outside the image root {root}")
    if not os.path.isfile(real):
        raise ImageError("image missing", f"image '{rel}' not found under {root}")
    return Path(real)


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """The image with only its header read, after the checks that need no decoding."""
    max_pixels = max_pixels or MAX_PIXELS
    if path.stat().st_size == 0:
        raise ImageError("image empty", f"image '{path}' is an empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
        try:
            image = Image.open(path)  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError("image oversized", f"image '{path}' is a decompression bomb: {e}") from None
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ... by format plugin
            raise ImageError("image unreadable", f"image '{path}' is unreadable as an image: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError("image oversized", f"image '{path}' is {width}x{height}, over the {max_pixels:,}-pixel limit")
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        image.close()
        raise ImageError(
            "image aspect ratio", f"image '{path}' is {width}x{height}, sides more than {MAX_ASPECT}:1 apart"
        )
    return image


def _as_viewed(image: Image.Image) -> Image.Image:
    if image.mode == "F":
        raise ImageError(
            "image mode unsupported", "has float-valued pixels (mode F), which have no fixed brightness scale"
        )
    image.seek(0)
    image = ImageOps.exif_transpose(image)  # a copy, without the orientation tag
    if image.mode in SIXTEEN_BIT:
        image = Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8), mode="L")
    if image.mode in WITH_ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """The RGB picture a viewer would show: first frame, upright, 16-bit scaled, transparency on white."""
    try:
        return _as_viewed(image)
    except ImageError as e:
        raise ImageError(e.category, f"{name}: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... for bad data
        raise ImageError("image corrupt", f"{name} cannot be decoded (truncated or corrupt): {e}") from None


def _decoded(path: Path, max_pixels: int | None) -> Image.Image:
    with _open_checked(path, max_pixels) as image:
        return to_rgb(image, f"image '{path}'")


def check(root: str | Path, rel: str, max_pixels: int | None = None, verify: bool = True) -> None:
    """Raise ImageError unless `load` would succeed (it decodes: a truncated file only shows then).

    verify=False reads the header only (path, format, size): for the stages, whose engine workers decode
    and report a failure there, so a million prompts do not wait for a serial decode on the driver.
    """
    path = resolve(root, rel)
    if verify:
        _decoded(path, max_pixels).close()
    else:
        _open_checked(path, max_pixels).close()


def load(root: str | Path, rel: str, max_pixels: int | None = None) -> Image.Image:
    """Decode one image as RGB, refusing or converting it as the module docstring says."""
    return _decoded(resolve(root, rel), max_pixels)


def decode(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode embedded image bytes (a `datasets` Image cell) as RGB, under the same limit and rules as `load`."""
    max_pixels = max_pixels or MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
        try:
            image = Image.open(io.BytesIO(data))
        except Exception as e:  # UnidentifiedImageError, DecompressionBombError, ... by format plugin
            raise ImageError("image unreadable", f"image '{name}' is unreadable as an image: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError("image oversized", f"image '{name}' is {width}x{height}, over the {max_pixels:,}-pixel limit")
    return to_rgb(image, f"image '{name}'")
