"""Broken and unusual images: each is refused as FILE:LINE (validate), quarantined (stage reader, training
loader) or converted to the RGB a viewer shows. The corpus is generated here, 22 files."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from mpo_data.records import images
from mpo_data.records.inputs import PromptReader
from mpo_data.records.jsonl import current_umask
from mpo_data.train.data import PairLoader


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with almost no pixel data: what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, left half red; orientation 6 says 'rotate 90 degrees clockwise to view'."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    image.paste(1, (0, 0, 4, 8))
    return encoded(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    red, blue = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    return encoded(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


def corrupt_crc_png() -> bytes:
    data = bytearray(encoded(Image.new("RGB", (32, 32), "red"), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # one byte of compressed pixels
    return bytes(data)


GOOD_PNG = encoded(Image.new("RGB", (64, 48), "red"), "PNG")
GOOD_JPEG = encoded(Image.new("RGB", (64, 48), "red"), "JPEG")
NOISE_JPEG = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)), "JPEG")

# name -> (file bytes, the category it is refused with)
REFUSED = {
    "bomb.png": (png_header_only(30_000, 30_000), "image oversized"),  # PIL's own bomb error at open
    "over_limit.png": (png_header_only(10_000, 10_000), "image oversized"),  # PIL warns; our 64 Mpx limit refuses
    "thin.png": (encoded(Image.new("RGB", (4_020, 20), "red"), "PNG"), "image aspect ratio"),
    "tall.png": (encoded(Image.new("L", (2, 1_000), 9), "PNG"), "image aspect ratio"),
    "empty.png": (b"", "image empty"),
    "text.png": (b"this is not a picture\n", "image unreadable"),
    "fake_jpeg.jpg": (b"\xff\xd8\xff\xe0" + b"\0" * 40, "image unreadable"),
    "truncated.png": (GOOD_PNG[: len(GOOD_PNG) // 2], "image corrupt"),
    "truncated.jpg": (NOISE_JPEG[: len(NOISE_JPEG) * 3 // 4], "image corrupt"),  # headers whole, scan cut
    "bad_crc.png": (corrupt_crc_png(), "image corrupt"),
    "float.tif": (encoded(Image.new("F", (8, 8), 0.5), "TIFF"), "image mode unsupported"),
}


def rgb_at(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))


# name -> (file bytes, check of the loaded RGB image)
CONVERTED = {
    "png_named.jpg": (GOOD_PNG, lambda im: im.size == (64, 48) and rgb_at(im, 1, 1) == (255, 0, 0)),
    "cmyk.jpg": (
        encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
        lambda im: rgb_at(im, 8, 8)[0] > 200 and max(rgb_at(im, 8, 8)[1:]) < 60,
    ),
    "grey16.png": (
        encoded(Image.fromarray(np.full((8, 8), 0x8080, np.uint16)), "PNG"),
        lambda im: rgb_at(im, 0, 0) == (128, 128, 128),
    ),  # PIL's own convert would give white
    "palette_transparent.png": (
        palette_with_transparency(),
        lambda im: rgb_at(im, 6, 4) == (255, 255, 255) and rgb_at(im, 1, 4) == (0, 255, 0),
    ),
    "rgba.png": (
        encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"),
        lambda im: rgb_at(im, 3, 3) == (255, 255, 255),
    ),
    "grey_alpha.png": (
        encoded(Image.new("LA", (8, 8), (0, 128)), "PNG"),
        lambda im: rgb_at(im, 3, 3) == (127, 127, 127),
    ),
    "animated.gif": (animated_gif(), lambda im: rgb_at(im, 8, 8) == (255, 0, 0)),  # first frame
    "exif_rotated.jpg": (
        exif_rotated_jpeg(),  # upright: 20 wide x 40 high, red on top
        lambda im: im.size == (20, 40) and rgb_at(im, 10, 5)[0] > 200 and rgb_at(im, 10, 35)[0] < 60,
    ),
    "one_bit.png": (encoded(Image.new("1", (8, 8), 1), "PNG"), lambda im: rgb_at(im, 0, 0) == (255, 255, 255)),
    "ycbcr.jpg": (GOOD_JPEG, lambda im: im.mode == "RGB" and rgb_at(im, 4, 4)[0] > 240),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name, (data, _) in {**REFUSED, **CONVERTED}.items():
        (root / name).write_bytes(data)
    return root


def test_corpus_is_large_enough():
    assert len(REFUSED) + len(CONVERTED) >= 15


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_images_raise_image_error_with_category(corpus, name):
    with pytest.raises(images.ImageError) as err:
        images.load(corpus, name)
    assert err.value.category == REFUSED[name][1] and name in str(err.value)
    with pytest.raises(images.ImageError):
        images.check(corpus, name)


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_usable_images_become_the_rgb_a_viewer_shows(corpus, name):
    images.check(corpus, name)
    image = images.load(corpus, name)
    assert image.mode == "RGB" and CONVERTED[name][1](image)


def prompt_file(tmp_path: Path) -> Path:
    lines = [
        {"image": name, "question": f"What is in {name}?", "answer": "x"} for name in sorted({**REFUSED, **CONVERTED})
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def test_validate_names_file_line_and_reason_for_each_refused_image(tmp_path, corpus):
    path = prompt_file(tmp_path)
    names = sorted({**REFUSED, **CONVERTED})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpo_data",
            "validate",
            str(path),
            "--kind",
            "correctness",
            "--image-root",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    expected = [f"{path}:{names.index(n) + 1}" for n in sorted(REFUSED)]
    assert [line.split(": ", 1)[0] for line in result.stdout.splitlines()] == expected


def test_stage_reader_quarantines_each_refused_image(tmp_path, corpus):
    path = prompt_file(tmp_path)
    reader = PromptReader(path, "correctness", "ds", corpus, on_error="skip", quarantine=tmp_path / "q.jsonl")
    kept = [item.image for item in reader]
    assert sorted(kept) == sorted(CONVERTED)
    assert dict(reader.quarantine.counts) == dict(Counter(category for _, category in REFUSED.values()))
    quarantined = [orjson.loads(line) for line in (tmp_path / "q.jsonl").read_bytes().splitlines()]
    assert sorted(q["line"]["image"] for q in quarantined) == sorted(REFUSED)
    assert (tmp_path / "q.jsonl").stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as open() would make it


def test_training_loader_quarantines_each_refused_image(tmp_path, corpus):
    pairs = [
        {"images": [name], "prompt": "What is it?", "chosen": "a", "rejected": "b"}
        for name in sorted({**REFUSED, **CONVERTED})
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in pairs))
    loader = PairLoader(on_error="skip", quarantine=tmp_path / "q.jsonl")
    rows = loader.read_dataset(path, corpus)
    assert len(rows.rows) == len(CONVERTED) and rows.quarantine.total == len(REFUSED)
    assert all(image.mode == "RGB" for row in rows.rows for image in row["images"])
