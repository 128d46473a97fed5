import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from app.data import Dataset, ShardWriter, decode_image, iter_samples
from app.data.importer import import_images


def _img(seed: int, w: int = 20, h: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _save(path, img: Image.Image, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "tree"
    files = {
        "cat/a.jpg": _save(root / "cat" / "a.jpg", _img(1), "JPEG"),
        "cat/b.png": _save(root / "cat" / "b.png", _img(2, 30, 10), "PNG"),
        "dog/c.jpg": _save(root / "dog" / "c.jpg", _img(3), "JPEG"),
        "dog/sub/e.PNG": _save(root / "dog" / "sub" / "e.PNG", _img(5), "PNG"),
        "loose.jpg": _save(root / "loose.jpg", _img(6), "JPEG"),
    }
    good = _save(root / "dog" / "d.jpeg", _img(4), "JPEG")
    (root / "dog" / "d.jpeg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "dog" / "f.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "notes.txt").write_text("labels are folder names\n")
    return root, files


def test_image_folder_import_labels_counts_and_skips(image_folder, tmp_path):
    root, files = image_folder
    stats = import_images(str(root), str(tmp_path / "ds"), name="tree", max_samples_per_shard=2)
    ds = Dataset(str(tmp_path / "ds"))
    rows = {r["source"]: r for r in ds.rows}
    assert sorted(rows) == sorted(files)
    assert ds.classes == ["cat", "dog"]
    assert {s: (r["label"], r["label_name"]) for s, r in rows.items()} == {
        "cat/a.jpg": (0, "cat"), "cat/b.png": (0, "cat"), "dog/c.jpg": (1, "dog"),
        "dog/sub/e.PNG": (1, "dog"), "loose.jpg": (None, None)}
    assert (stats["num_samples"], stats["num_labelled"], stats["num_unlabelled"]) == (5, 4, 1)
    assert stats["per_class"] == {"cat": 2, "dog": 2}
    assert stats["num_shards"] == 3 and stats["name"] == "tree"
    skipped = {s["source"]: s["reason"] for s in stats["skipped"]}
    assert sorted(skipped) == ["dog/d.jpeg", "dog/f.jpg", "notes.txt"]
    assert "truncated" in skipped["dog/d.jpeg"] or "decode" in skipped["dog/d.jpeg"]
    assert "not an image" in skipped["notes.txt"]
    # JPEGs are stored byte for byte; PNGs re-encoded with their size kept.
    assert rows["cat/a.jpg"]["sha256"] == hashlib.sha256(files["cat/a.jpg"]).hexdigest()
    assert (rows["cat/b.png"]["width"], rows["cat/b.png"]["height"]) == (30, 10)
    samples = {s.meta["source"]: s for s in iter_samples(ds.uri)}
    assert decode_image(samples["cat/b.png"].image_bytes).size == (30, 10)
    assert samples["cat/b.png"].meta["orig_format"] == "png"
    assert len(set(ds.keys)) == 5


def test_worker_processes_give_the_same_dataset(image_folder, tmp_path):
    root, _ = image_folder
    import_images(str(root), str(tmp_path / "one"), workers=1)
    import_images(str(root), str(tmp_path / "two"), workers=2)
    for rel in ("shards/shard-000000.tar", "index.parquet"):
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()


def test_loose_images_and_globs_import_unlabelled(tmp_path):
    for i in range(3):
        _save(tmp_path / "in" / f"img {i}.jpg", _img(i), "JPEG")
    _save(tmp_path / "in" / "img_0.png", _img(9), "PNG")  # same key stem as "img 0"
    stats = import_images(str(tmp_path / "in"), str(tmp_path / "ds"))
    assert stats["num_samples"] == 4 and stats["num_labelled"] == 0 and stats["num_classes"] == 0
    assert len(set(Dataset(str(tmp_path / "ds")).keys)) == 4

    stats = import_images(str(tmp_path / "in" / "*.jpg"), str(tmp_path / "ds2"))
    assert stats["num_samples"] == 3 and stats["input_mode"] == "images"


def test_tar_shards_import_keeps_keys_labels_and_bytes(tmp_path):
    src = tmp_path / "src"
    with ShardWriter(str(src), max_samples_per_shard=3) as w:
        for i in range(5):
            data = io.BytesIO()
            _img(i).save(data, "JPEG")
            w.write(f"k{i}", data.getvalue(), {"label": i % 2, "label_name": f"c{i % 2}"})
    stats = import_images(str(src / "shards"), str(tmp_path / "ds"))
    assert stats["input_mode"] == "shards" and stats["num_samples"] == 5
    a, b = Dataset(str(src)), Dataset(str(tmp_path / "ds"))
    assert a.keys == b.keys and a.labels == b.labels
    assert a.index.column("sha256").to_pylist() == b.index.column("sha256").to_pylist()
    assert b.classes == ["c0", "c1"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_images(str(tmp_path / "nowhere"), str(tmp_path / "ds"))
    assert not os.path.exists(tmp_path / "ds")
