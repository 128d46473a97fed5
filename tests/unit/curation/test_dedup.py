import io

import numpy as np
import pytest
from PIL import Image

from app.curation import dedup, knn


def _pool_with_duplicates(seed=0, n=400, d=128):
    """Random unit vectors plus planted near-copies: 3 groups of sizes 2, 3, 4."""
    rng = np.random.default_rng(seed)
    x = knn.l2_normalize(rng.standard_normal((n, d)))
    groups = [[10, 200], [5, 50, 350], [7, 8, 100, 399]]
    for g in groups:
        for j in g[1:]:
            x[j] = x[g[0]] + 0.05 * rng.standard_normal(d)
    return knn.l2_normalize(x), groups


def test_self_dedup_finds_planted_near_duplicates():
    x, groups = _pool_with_duplicates()
    res = dedup.self_dedup(x, k=8, threshold=0.6, index="flat")
    for g in groups:
        assert len(set(res.components[g].tolist())) == 1
        assert res.keep[g].sum() == 1 and res.keep[min(g)]  # lowest index is the representative
    planted = {j for g in groups for j in g}
    others = [i for i in range(len(x)) if i not in planted]
    assert res.keep[others].all()  # random unit vectors in 128-D are far below cos 0.6
    assert res.stats["n_removed"] == 1 + 2 + 3
    assert res.stats["component_size_histogram"] == {1: len(others), 2: 1, 3: 1, 4: 1}


def test_central_representative_is_closest_to_the_component_mean():
    x = knn.l2_normalize(np.array([[1, 0.3], [1, 0.0], [1, -0.31], [0, 1]], np.float32))
    comps = np.array([0, 0, 0, 3])
    keep = dedup.representatives(x, comps, "central")
    assert keep.tolist() == [False, True, False, True]


def test_relative_dedup_drops_whole_components_holding_eval_copies():
    x, groups = _pool_with_duplicates(seed=1)
    res = dedup.self_dedup(x, k=8, threshold=0.6, index="flat")
    rng = np.random.default_rng(9)
    # eval set: a copy of pool item 100 (in group [7, 8, 100, 399]) and of singleton 30, plus noise
    ev = np.stack([x[100] + 0.05 * rng.standard_normal(128), x[30] + 0.05 * rng.standard_normal(128)])
    ev = knn.l2_normalize(np.concatenate([ev, rng.standard_normal((5, 128))]))
    rel = dedup.relative_dedup(x, res.components, ev, threshold=0.45, k=8, index="flat")
    assert set(np.flatnonzero(rel.drop).tolist()) == {7, 8, 100, 399, 30}
    assert rel.stats["n_dropped_components"] == 2


def test_relative_dedup_rejects_mismatched_components():
    with pytest.raises(ValueError, match="pool_components"):
        dedup.relative_dedup(np.ones((3, 2)), np.zeros(2), np.ones((1, 2)))


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_phash_is_equal_for_resized_reencoded_copies_and_differs_for_other_images():
    rng = np.random.default_rng(0)
    # a smooth natural-looking image (low-entropy patterns make any pHash unstable)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((64, 64)).save(buf, format="JPEG", quality=85)
    other = np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((96, 96)))
    h_png, h_jpg, h_other = dedup.phash(_png(rgb)), dedup.phash(buf.getvalue()), dedup.phash(_png(other))
    assert dedup.hamming(h_png, h_jpg) <= 2
    assert dedup.hamming(h_png, h_other) > 10
    assert 0 <= h_png < 2**64


def test_hash_groups_join_identical_hashes():
    i, j = dedup.hash_groups(np.array([5, 7, 5, 9, 7, 5], dtype=np.uint64))
    assert sorted(zip(i.tolist(), j.tolist())) == [(2, 0), (4, 1), (5, 0)]


def test_extra_edges_from_hashes_join_components_the_embeddings_missed():
    x, _ = _pool_with_duplicates(seed=2)
    plain = dedup.self_dedup(x, k=8, threshold=0.6, index="flat")
    assert plain.components[20] != plain.components[21]
    merged = dedup.self_dedup(x, k=8, threshold=0.6, index="flat", extra_edges=(np.array([21]), np.array([20])))
    assert merged.components[21] == merged.components[20] == 20
    assert merged.stats["n_removed"] == plain.stats["n_removed"] + 1
