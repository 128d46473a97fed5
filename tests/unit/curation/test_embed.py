"""The embed stage on a tiny dataset: real shards, a real (random-init) ViT, corrupt images."""

import io

import numpy as np
import pytest
from PIL import Image

from app import storage
from app.config import load_config
from app.curation.artifacts import CurationRun
from app.curation.embed import embed_dataset, load_set, part_name


def _jpeg(rng, size=40):
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size, size)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def dataset(tmp_path):
    from app.data import ShardWriter

    rng = np.random.default_rng(0)
    uri = (tmp_path / "ds").as_uri()
    with ShardWriter(uri, max_samples_per_shard=4) as w:
        for i in range(10):
            data = b"\xff\xd8\xff\xe0 not a jpeg" if i in (3, 7) else _jpeg(rng)
            w.write(f"img-{i:03d}", data)
    return uri


def _cfg(tmp_path, **sets):
    overrides = [f"run.store={(tmp_path / 'store').as_uri()}", "curation.embed.arch=vit_tiny",
                 "curation.embed.image_size=28", "curation.embed.batch_size=3"]
    return load_config("curate_lvd", overrides + [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.parametrize("features,dim", [("cls", 192), ("cls+mean", 384)])
def test_vit_embeddings_are_normalised_and_corrupt_images_counted(tmp_path, dataset, features, dim):
    cfg = _cfg(tmp_path, **{"curation.embed.features": features})
    run = CurationRun(cfg.run.store, "e")
    stats = embed_dataset(run, "pool", dataset, cfg, rank=0, world_size=1)
    assert stats["images"] == 8 and stats["corrupt"] == 2
    data = load_set(run, "pool", dataset)
    assert data["embeddings"].shape == (8, dim)
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1, atol=1e-3)
    assert sorted(data["corrupt"].tolist()) == ["img-003", "img-007"]
    assert data["keys"].tolist() == [f"img-{i:03d}" for i in range(10) if i not in (3, 7)]


def test_ranks_take_disjoint_shards_and_embed_resumes_per_shard(tmp_path, dataset):
    cfg = _cfg(tmp_path, **{"curation.embed.model": "thumbnail"})
    run = CurationRun(cfg.run.store, "e")
    a = embed_dataset(run, "pool", dataset, cfg, rank=0, world_size=2)
    b = embed_dataset(run, "pool", dataset, cfg, rank=1, world_size=2)
    assert a["shards"] + b["shards"] == 3 and a["images"] + b["images"] == 8
    full = load_set(run, "pool", dataset)
    from app.data import Dataset

    shards = Dataset(dataset).shard_uris
    storage.delete(run.uri("embeddings", "pool", part_name(shards[1])))
    again = embed_dataset(run, "pool", dataset, cfg, rank=0, world_size=1)
    assert again["shards_skipped"] == 2 and again["shards_embedded"] == 1
    assert np.array_equal(load_set(run, "pool", dataset)["embeddings"], full["embeddings"])
