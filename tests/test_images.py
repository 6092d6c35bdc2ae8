from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dragons.images import DecodeOptions, ImageError, base_square, decode, decode_to_base
from dragons.local.synth import bad_file_catalogue


@pytest.mark.parametrize("name", sorted(bad_file_catalogue()))
def test_catalogue_decodes_or_fails_cleanly(name: str) -> None:
    data, expect = bad_file_catalogue()[name]
    if expect == "error":
        with pytest.raises(ImageError) as info:
            decode(data)
        assert info.value.kind in {"empty", "not_an_image", "truncated", "too_large", "decode_error"}
    else:
        img = decode(data)
        assert img.mode == "RGB"
        assert img.size == (400, 300)  # EXIF rotation applied: upright like the others


def test_reasons_are_specific() -> None:
    cat = bad_file_catalogue()
    assert _reason(cat["zero_byte.jpg"][0]) == "empty"
    assert _reason(cat["truncated.jpg"][0]) == "truncated"
    assert _reason(cat["notes.txt"][0]) == "not_an_image"
    assert _reason(cat["bomb.png"][0]) == "too_large"


def _reason(data: bytes) -> str:
    with pytest.raises(ImageError) as info:
        decode(data)
    return info.value.kind


def test_pixel_limit_is_configurable() -> None:
    data = bad_file_catalogue()["cmyk.jpg"][0]
    with pytest.raises(ImageError, match="too_large"):
        decode(data, DecodeOptions(max_pixels=1000))


def test_16bit_and_alpha_are_not_washed_out() -> None:
    cat = bad_file_catalogue()
    grey16 = np.asarray(decode(cat["grey16.png"][0]))
    grey8 = np.asarray(decode(cat["grey.jpg"][0]))
    assert abs(float(grey16.mean()) - float(grey8.mean())) < 10  # not clipped to white
    alpha = np.asarray(decode(cat["alpha.png"][0]))
    assert alpha.mean() > 100  # half-transparent pixels composited on white, not black


def test_base_square_and_draft_decoding() -> None:
    img = Image.new("RGB", (1000, 500), (10, 200, 30))
    sq = base_square(img, 256)
    assert sq.shape == (256, 256, 3) and sq.dtype == np.uint8
    import io

    buf = io.BytesIO()
    Image.new("RGB", (2592, 1944), (200, 10, 10)).save(buf, format="JPEG")
    out = decode_to_base(buf.getvalue(), 256)
    assert out.shape == (256, 256, 3)
    assert abs(int(out[..., 0].mean()) - 200) < 6


def test_base_square_resamples_only_the_square() -> None:
    """A thin strip (inside --max-pixels) must not be resized whole: 100 x 600,000 px
    used to become a 320 x 1.92M image (1.8 GB) before the crop."""
    import time

    import numpy as np
    from PIL import Image

    strip = Image.new("RGB", (100, 600_000), (10, 20, 30))
    t0 = time.perf_counter()
    sq = base_square(strip, 320)
    assert sq.shape == (320, 320, 3) and (sq == [10, 20, 30]).all() and time.perf_counter() - t0 < 2.0
    # The same picture as resizing the shorter side and centre-cropping, up to resampling.
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    old = np.asarray(photo.resize((427, 320), Image.BILINEAR).crop((53, 0, 373, 320)), dtype=np.int16)
    assert np.abs(base_square(photo, 320).astype(np.int16) - old).mean() < 3.0
