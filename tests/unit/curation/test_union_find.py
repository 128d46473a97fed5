import numpy as np
import pytest

from app.curation.union_find import connected_components, relabel


def test_components_of_hand_drawn_graph_are_labelled_by_smallest_member():
    # 0-1-2 chain, 3 alone, 4-5 and 5-7, 6 alone, 8-8 self loop only
    i = np.array([1, 2, 5, 7, 8])
    j = np.array([0, 1, 4, 5, 8])
    labels = connected_components(9, i, j)
    assert labels.tolist() == [0, 0, 0, 3, 4, 4, 6, 4, 8]


def test_edge_direction_and_order_do_not_change_components():
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    a = connected_components(500, i, j)
    perm = rng.permutation(300)
    b = connected_components(500, j[perm], i[perm])
    assert np.array_equal(a, b)


def test_long_shuffled_path_is_one_component():
    p = np.random.default_rng(1).permutation(10_000)
    labels = connected_components(10_000, p[:-1], p[1:])
    assert (labels == 0).all()


def test_matches_breadth_first_search_on_random_graph():
    rng = np.random.default_rng(2)
    n = 300
    i, j = rng.integers(0, n, 200), rng.integers(0, n, 200)
    adj = [[] for _ in range(n)]
    for a, b in zip(i, j):
        adj[a].append(b)
        adj[b].append(a)
    expected = [-1] * n
    for s in range(n):
        if expected[s] >= 0:
            continue
        stack = [s]
        expected[s] = s
        while stack:
            v = stack.pop()
            for w in adj[v]:
                if expected[w] < 0:
                    expected[w] = s
                    stack.append(w)
    assert connected_components(n, i, j).tolist() == expected


def test_relabel_gives_dense_ids_and_sizes():
    dense, sizes = relabel(np.array([4, 0, 4, 7]))
    assert dense.tolist() == [1, 0, 1, 2]
    assert sizes.tolist() == [1, 2, 1]


def test_edge_outside_range_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        connected_components(3, [0], [3])
