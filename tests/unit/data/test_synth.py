import json
import os

import numpy as np
import pytest

from app.data import Dataset, decode_image
from app.data.synth import SPLITS, synthesize
from app.data.synth_shapes import CLASS_NAMES

SMALL = dict(n_pool=60, n_seeds=16, n_eval_train=48, n_eval_val=32, image_size=64,
             max_samples_per_shard=16)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(str(out), seed=3, **SMALL)
    return out


def _files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _thumb(data: bytes, side: int = 16) -> np.ndarray:
    return np.asarray(decode_image(data).resize((side, side)), np.float32).ravel()


def test_same_seed_gives_byte_identical_output(synth_dir, tmp_path):
    synthesize(str(tmp_path / "again"), seed=3, **SMALL)
    first, second = _files(synth_dir), _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert any(p.endswith(".tar") for p in first)
    for rel in first:
        assert first[rel] == second[rel], rel


def test_different_seed_gives_different_images(synth_dir, tmp_path):
    synthesize(str(tmp_path / "other"), seed=4, **SMALL)
    a = Dataset(str(synth_dir / "eval_val")).index.column("sha256").to_pylist()
    b = Dataset(str(tmp_path / "other" / "eval_val")).index.column("sha256").to_pylist()
    assert not set(a) & set(b)


def test_labelled_splits_are_balanced_over_at_least_six_classes(synth_dir):
    for split, n in (("seeds", 16), ("eval_train", 48), ("eval_val", 32)):
        ds = Dataset(str(synth_dir / split))
        assert len(ds) == n
        assert ds.classes == list(CLASS_NAMES) and len(ds.classes) >= 6
        counts = np.bincount(ds.labels, minlength=len(CLASS_NAMES))
        assert counts.max() - counts.min() <= 1
        assert all(r["label_name"] == CLASS_NAMES[r["label"]] for r in ds.rows)
        assert all(51 <= r["width"] <= 74 and 51 <= r["height"] <= 74 for r in ds.rows)


def test_ground_truth_matches_the_pool(synth_dir):
    truth = json.loads((synth_dir / "ground_truth.json").read_text())
    pool = Dataset(str(synth_dir / "pool"))
    rows = {r["key"]: r for r in pool.rows}
    assert len(pool) == 60 and set(rows) == set(truth["pool_classes"])
    assert all(r["label"] is None for r in rows.values())

    dups = truth["pool_duplicates"]
    assert len(dups) == 6  # 10% of the pool
    assert all(d in rows and o in rows and o not in dups for d, o in dups.items())
    for d, o in dups.items():
        same = rows[d]["sha256"] == rows[o]["sha256"]
        assert same == (d in truth["exact_duplicates"])
        assert truth["pool_classes"][d] == truth["pool_classes"][o]

    eval_keys = set(Dataset(str(synth_dir / "eval_train")).keys) | set(
        Dataset(str(synth_dir / "eval_val")).keys)
    assert truth["eval_copies"] and all(
        p in rows and e in eval_keys for p, e in truth["eval_copies"].items())

    corrupt = truth["corrupt"]
    assert len(corrupt) == 3 and not set(corrupt) & set(rows)
    assert pool.stats["num_skipped"] == 3
    assert sorted(s["source"].rsplit("/", 1)[-1] for s in pool.stats["skipped"]) == sorted(corrupt)
    assert set(truth["splits"]) == set(SPLITS)


def test_near_duplicates_are_nearest_to_their_source(synth_dir):
    truth = json.loads((synth_dir / "ground_truth.json").read_text())
    pool = Dataset(str(synth_dir / "pool"))
    keys = pool.keys
    thumbs = np.stack([_thumb(pool.get(i).image_bytes) for i in range(len(pool))])
    near = 0
    for d, o in truth["pool_duplicates"].items():
        i = keys.index(d)
        dist = np.abs(thumbs - thumbs[i]).mean(1)
        dist[i] = np.inf
        near += keys[int(dist.argmin())] == o
    assert near >= len(truth["pool_duplicates"]) - 1


def test_classes_are_separable_by_simple_colour_features(synth_dir):
    # Nearest class mean on tiny thumbnails: far above chance (1/8) if classes look distinct.
    def feats(split):
        ds = Dataset(str(synth_dir / split))
        x = np.stack([_thumb(ds.get(i).image_bytes, 4) for i in range(len(ds))])
        return x, np.array(ds.labels)

    xt, yt = feats("eval_train")
    xv, yv = feats("eval_val")
    means = np.stack([xt[yt == c].mean(0) for c in range(len(CLASS_NAMES))])
    pred = np.abs(xv[:, None] - means[None]).mean(-1).argmin(1)
    assert (pred == yv).mean() > 0.35


def test_bad_arguments_are_rejected_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="n_pool"):
        synthesize(str(tmp_path), n_pool=-1)
    with pytest.raises(ValueError, match="image_size"):
        synthesize(str(tmp_path), image_size=4)
