import numpy as np
import pytest

from app.curation import knn


def _clustered(n, d, modes, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((modes, d)).astype(np.float32)
    x = c[rng.integers(0, modes, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return knn.l2_normalize(x)


def test_recall_at_k_counts_shared_ids_per_row():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [7, 8, 4]])
    assert knn.recall_at_k(approx, exact) == pytest.approx(3 / 6)
    assert knn.recall_at_k(exact, exact) == 1.0
    # ids shared across rows do not count for the wrong row
    assert knn.recall_at_k(np.array([[4, 5, 6], [1, 2, 3]]), exact) == 0.0


def test_flat_graph_matches_brute_force_and_finds_self_first():
    x = _clustered(300, 16, 5, 0)
    D, I = knn.knn_graph(x, 5, index="flat")
    sims = x @ x.T
    expected = np.argsort(-sims, axis=1)[:, :5]
    assert knn.recall_at_k(I, expected) > 0.99
    assert (I[:, 0] == np.arange(300)).mean() > 0.99
    assert np.allclose(D[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "ivfsq8", "hnsw"])
def test_approximate_indexes_reach_high_recall_on_clustered_data(kind):
    x = _clustered(4000, 32, 20, 1)
    _, exact = knn.knn_graph(x, 10, index="flat")
    _, approx = knn.knn_graph(x, 10, index=kind, nlist=32, nprobe=8, ef_search=64)
    assert knn.recall_at_k(approx, exact) > 0.85


def test_search_reports_missing_neighbours_as_minus_one():
    x = _clustered(3, 8, 1, 2)
    D, I = knn.search(x, x, 5, index="flat")
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()


def test_unknown_index_kind_is_an_error():
    with pytest.raises(ValueError, match="index must be one of"):
        knn.build_index(np.zeros((4, 2), np.float32), index="pq")


def test_cell_index_probing_every_cell_is_exact_search():
    x = _clustered(1500, 24, 12, 3)
    _, exact = knn.knn_graph(x, 8, index="flat")
    D, I = knn.knn_graph(x, 8, index="cells", nlist=20, nprobe=20)
    assert knn.recall_at_k(I, exact) == 1.0
    assert np.allclose(D, np.sort(D, axis=1)[:, ::-1])  # best first


def test_cell_index_reaches_high_recall_probing_a_few_cells():
    x = _clustered(6000, 32, 30, 4)
    _, exact = knn.knn_graph(x, 10, index="flat")
    _, few = knn.knn_graph(x, 10, index="cells", nlist=60, nprobe=1)
    _, more = knn.knn_graph(x, 10, index="cells", nlist=60, nprobe=6)
    assert knn.recall_at_k(more, exact) > 0.95
    assert knn.recall_at_k(more, exact) > knn.recall_at_k(few, exact)


def test_cell_index_with_shared_centroids_splits_queries_across_ranks():
    """Two 'ranks' reusing one partition and searching disjoint query slices reproduce the
    single-process graph row for row."""
    from app.curation.cell_index import CellIndex, train_cells

    x = _clustered(2000, 16, 10, 5)
    cents = train_cells(x, 16, seed=0)
    whole = CellIndex(x, centroids=cents, nprobe=3).search(x, 6)
    parts = [CellIndex(x, centroids=cents, nprobe=3).search(x[s], 6)
             for s in (slice(0, 700), slice(700, 2000))]
    assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])


def test_cell_index_pads_missing_neighbours_and_rejects_bad_centroids():
    from app.curation.cell_index import CellIndex

    x = _clustered(5, 8, 1, 6)
    D, I = knn.knn_graph(x, 8, index="cells", nlist=2, nprobe=2)
    assert (I[:, 5:] == -1).all() and np.isneginf(D[:, 5:]).all()
    assert sorted(I[0, :5].tolist()) == list(range(5))
    with pytest.raises(ValueError, match="centroids must be"):
        CellIndex(x, centroids=np.zeros((3, 4), np.float32))
