"""Draw small, photo-like labelled image sets, and a catalogue of broken files.

The demo and the tests need data that nobody has to download: two (or more)
"dragon" classes a CNN can tell apart, at photo-like sizes, plus every kind of
bad file a real bucket holds.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class DragonStyle:
    body: tuple[int, int, int]  # main colour of the dragon
    wing: tuple[int, int, int]  # wing colour
    sky: tuple[int, int, int]  # typical background


STYLES: dict[str, DragonStyle] = {
    "drogon": DragonStyle(body=(40, 30, 30), wing=(150, 20, 20), sky=(120, 90, 70)),
    "viserion": DragonStyle(body=(225, 205, 160), wing=(200, 160, 60), sky=(110, 150, 200)),
    "rhaegal": DragonStyle(body=(30, 90, 40), wing=(150, 120, 40), sky=(150, 150, 150)),
}


def _jitter(c: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)  # type: ignore[return-value]


def draw_dragon(style: DragonStyle, rng: np.random.Generator, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A noisy 'photo' of a dragon: a sky gradient, a body, two wings, a tail."""
    w, h = size
    sky = np.array(_jitter(style.sky, rng, 40), dtype=np.float32)
    grad = np.linspace(0.7, 1.2, h, dtype=np.float32)[:, None, None]
    base = np.clip(sky[None, None, :] * grad + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    d = ImageDraw.Draw(img)
    cx, cy = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 3, 2 * h // 3))
    s = int(rng.integers(min(w, h) // 8, min(w, h) // 4))
    body, wing = _jitter(style.body, rng, 25), _jitter(style.wing, rng, 25)
    flip = -1 if rng.random() < 0.5 else 1
    d.polygon([(cx, cy), (cx - 2 * s, cy - int(1.6 * s)), (cx - s // 2, cy - s // 3)], fill=wing)
    d.polygon([(cx, cy), (cx + 2 * s, cy - int(1.6 * s)), (cx + s // 2, cy - s // 3)], fill=wing)
    d.ellipse([cx - s, cy - s // 2, cx + s, cy + s // 2], fill=body)
    d.ellipse([cx + flip * s - s // 3, cy - s, cx + flip * s + s // 3, cy - s // 3], fill=body)
    d.line([(cx - flip * s, cy), (cx - flip * 2 * s, cy + s // 2)], fill=body, width=max(2, s // 5))
    for _ in range(int(rng.integers(0, 4))):  # clutter: clouds or rocks of either class' colour
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(5, s // 2 + 6))
        d.ellipse([x - r, y - r, x + r, y + r], fill=_jitter((128, 128, 128), rng, 60))
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.5))))


def write_dataset(
    root: str,
    classes: list[str],
    n_train: int,
    n_valid: int,
    seed: int = 0,
    size: tuple[int, int] = (480, 360),
    quality: int = 88,
) -> dict[str, int]:
    """Write root/train/<class>/*.jpg and root/valid/<class>/*.jpg; returns counts."""
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        for cls in classes:
            style = STYLES.get(cls) or DragonStyle(*(tuple(int(v) for v in rng.integers(0, 255, 3)) for _ in range(3)))  # type: ignore[arg-type]
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                jw = int(size[0] * rng.uniform(0.8, 1.25))
                jh = int(size[1] * rng.uniform(0.8, 1.25))
                draw_dragon(style, rng, (jw, jh)).save(os.path.join(folder, f"{cls}_{i:04d}.jpg"), quality=quality)
            counts[f"{split}/{cls}"] = n
    return counts


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; the rest never decodes
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_file_catalogue(seed: int = 1) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expectation): 'error' files must yield an error row,
    'ok' files are unusual but valid and must be scored."""
    rng = np.random.default_rng(seed)
    photo = draw_dragon(STYLES["drogon"], rng, (400, 300))
    good_jpeg = _jpeg(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = _jpeg(photo.rotate(90, expand=True), exif=exif.tobytes())
    gif = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    buf = io.BytesIO()
    gif.save(buf, format="GIF")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.new("L", photo.size, 128))
    grey16 = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "error"),
        "zero_byte.jpg": (b"", "error"),
        "notes.txt": (b"this is not an image\n", "error"),
        "text_named.jpg": (b"<html>not a jpeg</html>", "error"),
        "bomb.png": (png_bomb(), "error"),
        "palette.gif": (buf.getvalue(), "ok"),
        "alpha.png": (_png(rgba), "ok"),
        "cmyk.jpg": (_jpeg(photo.convert("CMYK")), "ok"),
        "grey.jpg": (_jpeg(photo.convert("L")), "ok"),
        "grey16.png": (_png(grey16), "ok"),
        "exif_rotated.jpg": (rotated, "ok"),
    }


def write_bad_files(folder: str, seed: int = 1) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, (data, expect) in bad_file_catalogue(seed).items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        out[name] = expect
    return out
