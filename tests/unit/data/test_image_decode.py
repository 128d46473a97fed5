import io

import numpy as np
import pytest
from PIL import Image

from app.data import CorruptImage, decode_image, probe_image, to_stored_jpeg


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _photo(w=40, h=30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)
    arr = np.stack([np.tile(x, (h, 1)), np.tile(x[::-1], (h, 1)), np.full((h, w), 90.0)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_decode_returns_rgb_for_grayscale_and_palette_inputs():
    for mode in ("L", "P", "CMYK"):
        img = _photo().convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        out = decode_image(_encode(img, fmt))
        assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    out = decode_image(_encode(img, "PNG"))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (10, 20, 30)


def test_truncated_jpeg_is_a_corrupt_image_naming_the_sample():
    data = _encode(_photo(), "JPEG")
    with pytest.raises(CorruptImage, match="cat/7.jpg: cannot decode"):
        decode_image(data[: len(data) // 2], name="cat/7.jpg")


@pytest.mark.parametrize("data", [b"", b"not an image at all", bytes(range(256)) * 4,
                                  b"\xff\xd8\xff\xe0" + b"\x00" * 500])
def test_garbage_is_a_corrupt_image(data):
    with pytest.raises(CorruptImage) as info:
        probe_image(data, name="x")
    assert str(info.value).startswith("x: ") and info.value.reason


def test_jpeg_is_stored_unchanged_and_png_is_reencoded():
    jpeg = _encode(_photo(), "JPEG")
    stored, info = to_stored_jpeg(jpeg)
    assert stored == jpeg and (info.format, info.width, info.height) == ("JPEG", 40, 30)

    png = _encode(_photo(), "PNG")
    stored, info = to_stored_jpeg(png)
    assert info.format == "PNG" and stored[:2] == b"\xff\xd8"
    diff = np.abs(np.asarray(decode_image(stored), np.float32) - np.asarray(_photo(), np.float32))
    assert diff.mean() < 3.0
