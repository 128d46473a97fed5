"""Image bytes in, RGB images out; anything undecodable is a `CorruptImage` that names the sample.

Shards store JPEG bytes. Other formats met on import are re-encoded once (`to_stored_jpeg`) so that
every reader downstream decodes a single format.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Images above this many pixels are refused as likely decompression bombs (a 3-byte-per-pixel
# decode of 400 MP is 1.2 GB). Large legitimate imagery (aerial, pathology) is below it and is
# downscaled at import (`max_side`); `dinoctl data import --max-pixels` moves the limit.
DEFAULT_MAX_PIXELS = 400_000_000
# Longest side of an imported image; larger ones are downscaled once, at import (0: keep as is).
DEFAULT_MAX_SIDE = 4096
# PIL's own process-wide limit (89 MP, an error above 179 MP) is replaced by the per-call one here.
Image.MAX_IMAGE_PIXELS = None
STORED_JPEG_QUALITY = 95
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


class CorruptImage(ValueError):
    """The bytes are not a decodable image; the message names the sample and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes
        return CorruptImage, (self.name, self.reason)


@dataclass(frozen=True)
class ImageInfo:
    format: str  # PIL format name of the input, e.g. "JPEG", "PNG"
    width: int  # of the decoded (and, at import, possibly downscaled) image
    height: int
    original_size: tuple[int, int] | None = None  # (width, height) of the input when downscaled


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    if max_pixels and img.width * img.height > max_pixels:
        raise CorruptImage(name, f"image too large: {img.width}x{img.height} is "
                                 f"{img.width * img.height / 1e6:.0f} MP, above the limit of "
                                 f"{max_pixels / 1e6:.0f} MP (dinoctl data import --max-pixels)")


def _open_fully(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_side: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Open and decode every byte of `data`; returns the image and the input's (width, height).
    With `max_side`, a JPEG is decoded at a reduced scale when that still leaves its longest side
    >= max_side (DCT scaling: fast, little memory)."""
    if not data:
        raise CorruptImage(name, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        size = img.size
        _check_size(img, name, max_pixels)
        if max_side and img.format == "JPEG" and max(img.size) > max_side:
            scale = max_side / max(img.size)
            img.draft(img.mode, (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        # `load()` decodes every byte: a truncated JPEG only fails here, not in `open()`.
        img.load()
    except CorruptImage:
        raise
    except UnidentifiedImageError:
        raise CorruptImage(name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(name, f"cannot decode ({exc})") from None
    return img, size


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB `PIL.Image`, raising `CorruptImage` naming `name` on failure."""
    return _to_rgb(_open_fully(data, name, max_pixels)[0])


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white rather than whatever colour the palette left there.
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def probe_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode `data` to validate it; return its format and size."""
    img = _open_fully(data, name, max_pixels)[0]
    return ImageInfo(img.format or "", img.width, img.height)


def encode_jpeg(img: Image.Image, quality: int = STORED_JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_stored_jpeg(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_side: int = 0) -> tuple[bytes, ImageInfo]:
    """The bytes to store in a shard: a JPEG within `max_side` unchanged; anything else (another
    format, or an image whose longest side is above `max_side`, which is downscaled to it with
    its aspect ratio kept) re-encoded as JPEG.

    Raises `CorruptImage` if `data` does not decode or has more than `max_pixels` pixels.
    """
    img, original = _open_fully(data, name, max_pixels, max_side)
    fmt = img.format or ""
    if max_side and max(original) > max_side:
        out = _to_rgb(img)
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return encode_jpeg(out), ImageInfo(fmt, out.width, out.height, original_size=original)
    if fmt == "JPEG" and img.mode in ("RGB", "L"):
        return data, ImageInfo(fmt, img.width, img.height)
    return encode_jpeg(_to_rgb(img)), ImageInfo(fmt, img.width, img.height)
