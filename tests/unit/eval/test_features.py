"""Feature extraction: eval transform, equality with the backbone, corrupt images, the cache."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.data.shards import ShardWriter
from app.eval.features import (dataset_features, eval_transform, extract_features, model_fingerprint,
                               resize_size)
from app.models import VisionTransformer


def _tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(embed_dim=32, depth=2, num_heads=1, img_size=28).eval()


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _dataset(uri: str, n: int, corrupt: int = 0, labelled: bool = True, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    with ShardWriter(uri, max_samples_per_shard=3) as w:
        for i in range(n):
            data = _jpeg(rng, 30 + i, 40)
            images.append(data)
            w.write(f"img-{i:03d}", data, {"label": i % 3 if labelled else None, "label_name": None})
        for i in range(corrupt):
            w.write(f"bad-{i:03d}", b"\xff\xd8\xff\xe0 not a jpeg", {"label": 0})
    return images


def test_eval_transform_resizes_shorter_side_to_256_over_224_and_centre_crops():
    assert resize_size(224) == 256 and resize_size(28) == 32 and resize_size(518) == 592
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 40))  # the left quarter is cropped away
    x = eval_transform(28)(img)
    assert x.shape == (3, 28, 28)
    red = (1.0 - 0.485) / 0.229
    assert torch.allclose(x[0], torch.full((28, 28), red), atol=0.05)


def test_features_equal_backbone_output_and_corrupt_images_are_skipped(tmp_path):
    uri = (tmp_path / "ds").as_uri()
    images = _dataset(uri, 5, corrupt=2)
    model = _tiny_vit()
    feats = extract_features(model, uri, image_size=28, batch_size=2, n_last_blocks=2, num_workers=2)
    assert len(feats) == 5 and sorted(feats.corrupt) == ["bad-000", "bad-001"]
    assert feats.labels.tolist() == [0, 1, 2, 0, 1]
    from app.data.decode import decode_image

    tf = eval_transform(28)
    x = torch.stack([tf(decode_image(b)) for b in images])
    with torch.no_grad():
        expected = model(x)
        patches = model.forward_features(x)["x_norm_patchtokens"].mean(1)
    assert torch.allclose(feats.cls, expected, atol=1e-5)
    assert torch.allclose(feats.patch_mean, patches, atol=1e-5)
    assert feats.cls_blocks.shape == (5, 2, 32) and torch.equal(feats.cls_blocks[:, -1], feats.cls)
    assert feats.linear_input("cls", 1).shape == (5, 32)
    assert feats.linear_input("cls+mean", 2).shape == (5, 96)


def test_feature_cache_hits_on_second_call_and_misses_when_model_or_data_change(tmp_path):
    uri = (tmp_path / "ds").as_uri()
    store = (tmp_path / "store").as_uri()
    _dataset(uri, 4)
    model = _tiny_vit()
    first = dataset_features(model, uri, store, image_size=28, batch_size=4)
    second = dataset_features(model, uri, store, image_size=28, batch_size=4)
    assert not first.from_cache and second.from_cache
    assert torch.equal(first.cls, second.cls) and first.keys == second.keys
    assert len(list((tmp_path / "store" / "cache" / "features").glob("*.pt"))) == 1

    with torch.no_grad():
        model.blocks[0].attn.proj.bias.add_(0.5)  # a new model: the old features must not be reused
    changed = dataset_features(model, uri, store, image_size=28, batch_size=4)
    assert not changed.from_cache and not torch.allclose(changed.cls, first.cls)
    other_size = dataset_features(model, uri, store, image_size=14, batch_size=4)
    assert not other_size.from_cache

    _dataset(uri, 5)  # rewritten dataset: new index hash
    grown = dataset_features(model, uri, store, image_size=28, batch_size=4)
    assert not grown.from_cache and len(grown) == 5


def test_fingerprint_depends_on_weights_not_on_the_instance():
    a, b, c = _tiny_vit(0), _tiny_vit(0), _tiny_vit(1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)


def test_unlabelled_dataset_and_bad_image_size_are_named_errors(tmp_path):
    uri = (tmp_path / "ds").as_uri()
    _dataset(uri, 2, labelled=False)
    with pytest.raises(ValueError, match="has no label"):
        extract_features(_tiny_vit(), uri, image_size=28)
    with pytest.raises(ValueError, match="eval.image_size"):
        extract_features(_tiny_vit(), uri, image_size=30)
