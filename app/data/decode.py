"""Image bytes in, RGB images out; anything undecodable is a `CorruptImage` that names the sample.

Shards store JPEG bytes. Other formats met on import are re-encoded once (`to_stored_jpeg`) so that
every reader downstream decodes a single format.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Files bigger than this (in pixels) are refused as likely decompression bombs.
MAX_PIXELS = 100_000_000
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
    format: str  # PIL format name, e.g. "JPEG", "PNG"
    width: int
    height: int


def _open_fully(data: bytes, name: str) -> Image.Image:
    if not data:
        raise CorruptImage(name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise CorruptImage(name, f"image too large ({img.width}x{img.height})")
            # `load()` decodes every byte: a truncated JPEG only fails here, not in `open()`.
            img.load()
    except CorruptImage:
        raise
    except UnidentifiedImageError:
        raise CorruptImage(name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise CorruptImage(name, f"cannot decode ({exc})") from None
    return img


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Decode `data` into an RGB `PIL.Image`, raising `CorruptImage` naming `name` on failure."""
    img = _open_fully(data, name)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white rather than whatever colour the palette left there.
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def probe_image(data: bytes, name: str = "image") -> ImageInfo:
    """Fully decode `data` to validate it; return its format and size."""
    img = _open_fully(data, name)
    return ImageInfo(img.format or "", img.width, img.height)


def encode_jpeg(img: Image.Image, quality: int = STORED_JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_stored_jpeg(data: bytes, name: str = "image") -> tuple[bytes, ImageInfo]:
    """The bytes to store in a shard: JPEG input unchanged, anything else re-encoded as JPEG.

    Raises `CorruptImage` if `data` does not decode. The returned info describes the input.
    """
    img = _open_fully(data, name)
    info = ImageInfo(img.format or "", img.width, img.height)
    if info.format == "JPEG" and img.mode in ("RGB", "L"):
        return data, info
    return encode_jpeg(decode_image(data, name)), info
