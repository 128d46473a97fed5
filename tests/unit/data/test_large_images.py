"""Large legitimate images are downscaled at import; pathological sizes are refused with one
line; both limits are settings (`dinoctl data import --max-side / --max-pixels`)."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from app.data import Dataset, decode_image, iter_samples
from app.data.decode import CorruptImage, to_stored_jpeg
from app.data.importer import import_images


def _aerial(w: int, h: int) -> Image.Image:
    """A large greyscale image with structure (cheap to encode: mostly flat)."""
    img = Image.new("L", (w, h), 90)
    draw = ImageDraw.Draw(img)
    for i in range(0, w, w // 12):
        draw.rectangle([i, h // 4, i + w // 40, 3 * h // 4], fill=200)
    return img


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (what a decompression bomb looks like at open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_12000_by_10000_png_in_an_image_folder_is_imported_downscaled(tmp_path):
    root = tmp_path / "tree" / "aerial"
    root.mkdir(parents=True)
    (root / "big.png").write_bytes(_bytes(_aerial(12000, 10000), "PNG", compress_level=1))
    (root / "small.png").write_bytes(_bytes(_aerial(120, 100), "PNG"))
    stats = import_images(str(tmp_path / "tree"), str(tmp_path / "ds"), max_side=2048)
    assert stats["num_skipped"] == 0, stats["skipped"]
    rows = {r["source"]: r for r in Dataset(str(tmp_path / "ds")).rows}
    assert (rows["aerial/big.png"]["width"], rows["aerial/big.png"]["height"]) == (2048, 1707)
    assert (rows["aerial/small.png"]["width"], rows["aerial/small.png"]["height"]) == (120, 100)
    samples = {s.meta["source"]: s for s in iter_samples(str(tmp_path / "ds"))}
    big = samples["aerial/big.png"]
    assert (big.meta["orig_width"], big.meta["orig_height"]) == (12000, 10000)
    assert decode_image(big.image_bytes).size == (2048, 1707)
    assert "orig_width" not in samples["aerial/small.png"].meta


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_stored_within_max_side():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)).resize((5000, 3000))
    data = _bytes(img, "JPEG", quality=80)
    stored, info = to_stored_jpeg(data, "photo.jpg", max_side=1024)
    assert (info.width, info.height, info.original_size) == (1024, 614, (5000, 3000))
    assert decode_image(stored).size == (1024, 614)
    same, info = to_stored_jpeg(data, "photo.jpg", max_side=0)
    assert same == data and (info.width, info.height) == (5000, 3000)


def test_pathological_sizes_are_refused_with_one_line_and_the_limit_is_a_setting(tmp_path):
    bomb = _png_header_only(100_000, 100_000)
    with pytest.raises(CorruptImage) as exc:
        to_stored_jpeg(bomb, "bomb.png")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("bomb.png: image too large: 100000x100000")
    assert "--max-pixels" in msg

    root = tmp_path / "in"
    root.mkdir()
    (root / "bomb.png").write_bytes(bomb)
    (root / "mid.png").write_bytes(_bytes(_aerial(400, 300), "PNG"))
    stats = import_images(str(root), str(tmp_path / "ds"), max_pixels=100_000)
    skipped = {s["source"]: s["reason"] for s in stats["skipped"]}
    assert sorted(skipped) == ["bomb.png", "mid.png"]
    assert skipped["mid.png"].startswith("image too large: 400x300")
    stats = import_images(str(root), str(tmp_path / "ds2"), max_pixels=200_000)
    assert [s["source"] for s in stats["skipped"]] == ["bomb.png"] and stats["num_samples"] == 1


def test_the_cli_names_a_bad_limit(tmp_path, capsys):
    from app.cli import main

    (tmp_path / "in").mkdir()
    rc = main(["data", "import", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), "--max-side", "-1"])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "dinoctl: error: --max-side must be >= 0 (0: no limit), got -1"
