"""Datasets written to and streamed from a real S3 server (SeaweedFS)."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from app import storage
from app.data import Dataset, ShardWriter, iter_samples
from app.data.importer import import_images
from app.data.synth import synthesize

pytestmark = pytest.mark.slow


def test_synth_to_s3_then_stream_and_random_access(s3_env, s3_server):
    out = s3_server.uri("synth")
    synthesize(out, seed=2, n_pool=30, n_seeds=8, n_eval_train=8, n_eval_val=8, image_size=64,
               max_samples_per_shard=8)
    truth = storage.get_json(storage.join(out, "ground_truth.json"))
    pool = Dataset(storage.join(out, "pool"))
    assert len(pool) == 30 and pool.stats["num_shards"] == 4
    assert all(u.startswith("s3://") for u in pool.shard_uris)
    assert set(pool.keys) == set(truth["pool_classes"])

    streamed = list(iter_samples(pool.uri))
    assert [s.key for s in streamed] == pool.keys
    assert [hashlib.sha256(s.image_bytes).hexdigest() for s in streamed] == \
        pool.index.column("sha256").to_pylist()
    for i in (0, 9, 29):  # ranged reads land on the same bytes
        assert pool.get(i).image_bytes == streamed[i].image_bytes

    parts = [[s.key for s in pool.iter_samples(r, 3)] for r in range(3)]
    assert sorted(k for p in parts for k in p) == sorted(pool.keys)


def test_s3_dataset_is_incomplete_until_stats_are_written(s3_env, s3_server):
    uri = s3_server.uri("ds")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    w = ShardWriter(uri, max_samples_per_shard=1)
    w.write("a", buf.getvalue(), {"label": 0, "label_name": "zero"})
    w.write("b", buf.getvalue(), {"label": 0, "label_name": "zero"})
    assert storage.exists(storage.join(uri, "shards/shard-000000.tar"))
    assert not storage.exists(storage.join(uri, "index.parquet"))
    with pytest.raises(storage.StorageError, match="not a complete dataset"):
        Dataset(uri)
    w.close()
    assert Dataset(uri).labels == [0, 0]


def test_import_image_folder_into_s3(s3_env, s3_server, tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            (tmp_path / "tree" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(
                tmp_path / "tree" / cls / f"{i}.png")
    (tmp_path / "tree" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    uri = s3_server.uri("imported")
    stats = import_images(str(tmp_path / "tree"), uri, max_samples_per_shard=4)
    assert stats["per_class"] == {"a": 3, "b": 3} and stats["num_skipped"] == 1
    remote = json.loads(storage.get_bytes(storage.join(uri, "_stats.json")))
    assert remote["skipped"][0]["source"] == "b/bad.png"
    assert [s.label for s in iter_samples(uri)] == [0, 0, 0, 1, 1, 1]
