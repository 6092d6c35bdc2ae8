"""Decode image bytes into RGB, robustly, in our own code.

Used by training, scoring and ``predict`` alike. Ray's ``read_images`` aborts the
whole dataset on one bad file without naming it, so every decode goes through
here and a failure becomes an :class:`ImageError` with a short reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dragons.rowerrors import ErrorKind

# Extensions we treat as images when walking a folder; anything else is skipped
# and counted (README files, .DS_Store, CSVs ...).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)

# Decompression-bomb guard: 8K x 8K is larger than any camera photo we expect;
# a bigger header is refused before the pixels are allocated.
DEFAULT_MAX_PIXELS = 64_000_000

# Truncated files must fail, not be padded with grey: a half image is a bad row.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(Exception):
    """An image that cannot be used: its row error's ``kind`` and a short message."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Smallest side we need after decoding; lets libjpeg decode at 1/2, 1/4 or
    # 1/8 scale (JPEG "draft" mode), the biggest single saving in scoring.
    min_side: int | None = None


def decode(data: bytes, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Bytes -> upright RGB PIL image, or :class:`ImageError`."""
    if not data:
        raise ImageError(ErrorKind.EMPTY, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > options.max_pixels:
                raise ImageError(ErrorKind.TOO_LARGE, f"{w}x{h} pixels exceeds the limit of {options.max_pixels}")
            if options.min_side and img.format == "JPEG":
                # draft keeps both sides >= the request, so the short side stays >= min_side.
                scale = min(w, h) / options.min_side
                if scale >= 2:
                    img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(ErrorKind.NOT_AN_IMAGE, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(ErrorKind.TOO_LARGE, str(exc)[:200]) from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)[:200]
        truncated = "truncated" in msg.lower() or "broken data stream" in msg.lower()
        raise ImageError(ErrorKind.TRUNCATED if truncated else ErrorKind.DECODE_ERROR, msg) from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: palette, alpha, CMYK, greyscale, 16-bit and float."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # convert("RGB") would clip 16-bit values to white; rescale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        # Composite transparent areas on white: dropping alpha leaves arbitrary colours.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def base_square(img: Image.Image, side: int) -> np.ndarray:
    """The centred square of the image, resized to ``side`` (uint8 HWC): what
    resizing the shorter side to ``side`` and centre-cropping gives, but only the
    square is resampled. Resizing the whole image first cost resampling time for
    the margins it then dropped, and memory in proportion to the aspect ratio: a
    100 x 600,000 px strip (60 MP, inside --max-pixels) became a 1.8 GB image."""
    w, h = img.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))  # the whole image's size after the resize
    left, top = (nw - side) // 2, (nh - side) // 2  # the crop there, mapped back to the source below
    sx, sy = nw / w, nh / h
    box = (left / sx, top / sy, (left + side) / sx, (top + side) / sy)
    return np.asarray(img.resize((side, side), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0), dtype=np.uint8)


def decode_to_base(data: bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> base square; raises ``images.ImageError`` on a bad image."""
    return base_square(decode(data, DecodeOptions(max_pixels=max_pixels, min_side=side)), side)
