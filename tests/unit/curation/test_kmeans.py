import numpy as np
import pytest

from app.curation.kmeans import assign, hierarchical_kmeans, kmeans

CENTERS = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)


def _blobs(sizes, seed=0, spread=0.5):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, spread, (n, 2)) for c, n in zip(CENTERS, sizes)]).astype(np.float32)
    y = np.repeat(np.arange(len(sizes)), sizes)
    return x, y


def _pure(labels, y):
    """Every found cluster holds a single true blob, and every blob maps to one cluster."""
    pairs = set(zip(labels.tolist(), y.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len(set(y.tolist()))


@pytest.mark.parametrize("init", ["kmeans++", "faiss"])
def test_kmeans_recovers_blobs(init):
    x, y = _blobs([100, 80, 60, 120])
    res = kmeans(x, 4, n_iters=20, init=init, seed=0)
    assert _pure(res.labels, y)
    assert np.allclose(np.sort(res.centroids, axis=0), np.sort(CENTERS, axis=0), atol=0.3)
    if init == "kmeans++":
        assert all(a >= b - 1e-3 for a, b in zip(res.objective, res.objective[1:]))


def test_assign_picks_nearest_centroid_with_squared_distance():
    labels, d = assign(np.array([[1, 0], [9, 9]], np.float32), CENTERS)
    assert labels.tolist() == [0, 3]
    assert np.allclose(d, [1.0, 2.0])


def test_hierarchical_kmeans_recovers_blobs_at_top_level():
    x, y = _blobs([300, 40, 150, 20], seed=1)
    tree = hierarchical_kmeans(x, n_clusters=[20, 4], n_resampling_steps=[3, 2],
                               sample_size=[5, 2], n_iters=15, seed=0)
    assert len(tree.levels) == 2
    top_of_point = tree.levels[1].assignment[tree.levels[0].assignment]
    assert _pure(top_of_point, y)
    assert tree.flat_sizes()[1].sum() == len(x)


def test_hierarchical_kmeans_rejects_too_many_clusters():
    x, _ = _blobs([5, 5, 5, 5])
    with pytest.raises(ValueError, match="n_clusters\\[1\\]"):
        hierarchical_kmeans(x, [10, 12], [1, 1], [1, 1], n_iters=2)
