import hashlib
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from app import storage
from app.data import (Dataset, ShardWriter, iter_samples, iter_tar_samples, read_index,
                      shards_for_rank)


def _jpeg(i: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(uri: str, n: int, **kw) -> dict:
    with ShardWriter(uri, **kw) as w:
        for i in range(n):
            label = i % 3 if i % 4 else None
            w.write(f"s{i:03d}", _jpeg(i), {"label": label,
                                            "label_name": None if label is None else f"c{label}",
                                            "source": f"src/{i}.jpg", "extra": i * 10})
    return w.stats


def test_shards_split_at_max_samples_per_shard(tmp_path):
    stats = _write(str(tmp_path / "ds"), 7, max_samples_per_shard=3)
    assert stats["num_shards"] == 3
    ds = Dataset(str(tmp_path / "ds"))
    per_shard = [sum(1 for _ in iter_samples(ds.uri, [s])) for s in ds.shard_uris]
    assert per_shard == [3, 3, 1]
    shard_col = read_index(ds.uri).column("shard").to_pylist()
    assert shard_col == ["shards/shard-000000.tar"] * 3 + ["shards/shard-000001.tar"] * 3 + [
        "shards/shard-000002.tar"]


def test_shards_split_at_max_bytes_but_never_empty(tmp_path):
    one = len(_jpeg(0))
    stats = _write(str(tmp_path / "ds"), 5, max_samples_per_shard=100, max_bytes=one + 3000)
    # Each sample (plus its headers) fills a shard on its own; no shard is left empty.
    assert stats["num_shards"] == 5
    ds = Dataset(str(tmp_path / "ds"))
    assert [sum(1 for _ in iter_samples(ds.uri, [s])) for s in ds.shard_uris] == [1] * 5


def test_index_offsets_point_at_the_image_bytes(tmp_path):
    _write(str(tmp_path / "ds"), 6, max_samples_per_shard=4)
    ds = Dataset(str(tmp_path / "ds"))
    for i, row in enumerate(ds.rows):
        with open(tmp_path / "ds" / row["shard"], "rb") as f:
            f.seek(row["offset"])
            data = f.read(row["size"])
        assert data == _jpeg(i)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert ds.get(i).image_bytes == data
        assert ds.get(i).key == row["key"]


def test_iter_samples_streams_all_samples_in_order_with_metadata(tmp_path):
    _write(str(tmp_path / "ds"), 9, max_samples_per_shard=4)
    samples = list(iter_samples(str(tmp_path / "ds")))
    assert [s.key for s in samples] == [f"s{i:03d}" for i in range(9)]
    for i, s in enumerate(samples):
        assert s.image_bytes == _jpeg(i)
        assert s.meta["extra"] == i * 10
        assert s.label == (i % 3 if i % 4 else None)
        assert s.meta["source"] == f"src/{i}.jpg"


class _OneWayStream(io.RawIOBase):
    """A forward-only stream, like an HTTP body: seeking fails."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return False

    def seek(self, *args):
        raise io.UnsupportedOperation("seek")

    def readinto(self, b):
        chunk = self._buf.read(min(len(b), 997))  # odd-sized reads, as from a socket
        b[: len(chunk)] = chunk
        return len(chunk)


def test_tar_reader_needs_no_seeking(tmp_path):
    _write(str(tmp_path / "ds"), 5, max_samples_per_shard=10)
    data = (tmp_path / "ds" / "shards" / "shard-000000.tar").read_bytes()
    samples = list(iter_tar_samples(io.BufferedReader(_OneWayStream(data))))
    assert [s.image_bytes for s in samples] == [_jpeg(i) for i in range(5)]


def test_index_and_stats_appear_only_after_every_shard(tmp_path):
    uri = str(tmp_path / "ds")
    w = ShardWriter(uri, max_samples_per_shard=2)
    for i in range(3):
        w.write(f"k{i}", _jpeg(i), {})
    assert (tmp_path / "ds" / "shards" / "shard-000000.tar").exists()
    assert not (tmp_path / "ds" / "index.parquet").exists()
    assert not (tmp_path / "ds" / "_stats.json").exists()
    w.close()
    assert (tmp_path / "ds" / "shards" / "shard-000001.tar").exists()
    assert (tmp_path / "ds" / "index.parquet").exists()
    assert (tmp_path / "ds" / "_stats.json").exists()
    assert len(Dataset(uri)) == 3


def test_failed_write_leaves_a_dataset_that_reads_as_incomplete(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri, 4, max_samples_per_shard=2)  # a complete older version at the same place
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(uri, max_samples_per_shard=2) as w:
            for i in range(3):
                w.write(f"k{i}", _jpeg(i), {})
            raise RuntimeError("boom")
    with pytest.raises(storage.StorageError, match="not a complete dataset"):
        Dataset(uri)
    assert not [p for p in os.listdir(tmp_path / "ds" / "shards") if not p.endswith(".tar")]


def test_rewriting_a_dataset_removes_stale_shards(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri, 5, max_samples_per_shard=1)
    _write(uri, 2, max_samples_per_shard=1)
    shards = sorted(os.listdir(tmp_path / "ds" / "shards"))
    assert shards == ["shard-000000.tar", "shard-000001.tar"]
    assert len(list(iter_samples(uri))) == 2


def test_same_input_gives_byte_identical_output(tmp_path):
    _write(str(tmp_path / "a"), 7, max_samples_per_shard=3)
    _write(str(tmp_path / "b"), 7, max_samples_per_shard=3)
    for rel in ["shards/shard-000000.tar", "shards/shard-000002.tar", "index.parquet"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    with tarfile.open(tmp_path / "a" / "shards" / "shard-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tar.getmembers()} == {(0, 0, 0, "")}


def test_stats_count_samples_classes_and_skips(tmp_path):
    uri = str(tmp_path / "ds")
    with ShardWriter(uri, max_samples_per_shard=4, created_by="test") as w:
        for i in range(6):
            w.write(f"k{i}", _jpeg(i), {"label": i % 2, "label_name": ["ant", "bee"][i % 2]})
        w.write("u", _jpeg(9), {})
        w.skip("bad.jpg", "cannot decode")
    ds = Dataset(uri)
    s = ds.stats
    assert (s["num_samples"], s["num_labelled"], s["num_unlabelled"]) == (7, 6, 1)
    assert s["per_class"] == {"ant": 3, "bee": 3}
    assert ds.classes == ["ant", "bee"]
    assert ds.labels == [0, 1, 0, 1, 0, 1, None]
    assert s["skipped"] == [{"source": "bad.jpg", "reason": "cannot decode"}]
    assert s["created_by"] == "test"
    assert s["bytes"] == sum(os.path.getsize(tmp_path / "ds" / sh) for sh in s["shards"])


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "a b"])
def test_keys_that_would_break_member_names_are_rejected(tmp_path, key):
    with pytest.raises(ValueError, match="sample key"):
        ShardWriter(str(tmp_path / "ds")).write(key, _jpeg(0), {})


def test_duplicate_keys_and_non_int_labels_are_rejected(tmp_path):
    w = ShardWriter(str(tmp_path / "ds"))
    w.write("a", _jpeg(0), {})
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", _jpeg(1), {})
    with pytest.raises(ValueError, match="label must be an int"):
        w.write("b", _jpeg(1), {"label": "3"})
    w.abort()


@pytest.mark.parametrize("n_shards,world", [(7, 3), (2, 4), (8, 1)])
def test_shards_for_rank_are_disjoint_and_cover_every_shard(n_shards, world):
    shards = [f"s{i}" for i in range(n_shards)]
    parts = [shards_for_rank(shards, r, world) for r in range(world)]
    flat = [s for p in parts for s in p]
    assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))
    assert parts == [shards_for_rank(shards, r, world) for r in range(world)]
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_shards_for_rank_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shards_for_rank(["a"], 2, 2)


def test_dataset_rank_iterators_partition_the_samples(tmp_path):
    _write(str(tmp_path / "ds"), 10, max_samples_per_shard=2)
    ds = Dataset(str(tmp_path / "ds"))
    keys = [[s.key for s in ds.iter_samples(r, 3)] for r in range(3)]
    assert sorted(k for part in keys for k in part) == ds.keys
    assert not set(keys[0]) & set(keys[1])


def test_shard_files_stay_within_max_bytes(tmp_path):
    limit = 40_000
    stats = _write(str(tmp_path / "ds"), 30, max_samples_per_shard=1000, max_bytes=limit)
    sizes = [os.path.getsize(tmp_path / "ds" / s) for s in stats["shards"]]
    assert len(sizes) > 2 and max(sizes) <= limit
    # Shards are filled, not cut early: the next sample would not have fitted.
    assert min(sizes[:-1]) > limit - tarfile.RECORDSIZE - 2 * (len(_jpeg(0)) + 1536)


def test_dataset_survives_pickling_after_random_access(tmp_path):
    import pickle

    _write(str(tmp_path / "ds"), 4, max_samples_per_shard=2)
    ds = Dataset(str(tmp_path / "ds"))
    first = ds.get(3).image_bytes  # leaves a shard reader open
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.get(3).image_bytes == first == _jpeg(3)
    assert [clone.get(i).key for i in (2, 0, 1)] == ["s002", "s000", "s001"]
    ds.close()
