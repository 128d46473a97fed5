import numpy as np
import pytest

from app.curation.kmeans import ClusterTree, Level, hierarchical_kmeans
from app.curation.sampling import balanced_sample, water_filling


def test_water_filling_caps_large_clusters_at_a_common_level():
    # level 3: min(10,3)+min(1,3)+min(5,3)+min(3,3) = 3+1+3+3 = 10 exactly
    assert water_filling([10, 1, 5, 3], 10).tolist() == [3, 1, 3, 3]


def test_water_filling_gives_leftover_to_the_largest_cluster_first():
    # level 3 gives 10; level 4 would give 12 > 11; the one leftover unit goes to size 10
    assert water_filling([10, 1, 5, 3], 11).tolist() == [4, 1, 3, 3]
    assert water_filling([2, 6, 6], 9).tolist() == [2, 4, 3]


def test_water_filling_takes_everything_when_target_exceeds_total():
    assert water_filling([10, 1, 5, 3], 100).tolist() == [10, 1, 5, 3]
    assert water_filling([2, 1], 100, multiplier=3).tolist() == [6, 3]


def test_water_filling_sums_to_target():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 50, rng.integers(1, 20))
        target = int(rng.integers(0, sizes.sum() + 1))
        alloc = water_filling(sizes, target)
        assert alloc.sum() == target and (alloc <= sizes).all()


def _two_level_tree(leaf_sizes, leaf_parents, seed=0):
    rng = np.random.default_rng(seed)
    assignment = np.repeat(np.arange(len(leaf_sizes)), leaf_sizes)
    dists = rng.random(assignment.size).astype(np.float32)
    k1 = len(leaf_sizes)
    k2 = max(leaf_parents) + 1
    return ClusterTree([
        Level(np.zeros((k1, 2), np.float32), assignment, dists),
        Level(np.zeros((k2, 2), np.float32), np.asarray(leaf_parents), np.zeros(k1, np.float32)),
    ])


@pytest.mark.parametrize("multiplier", [1, 2, 3])
@pytest.mark.parametrize("sampling", ["random", "closest"])
def test_balanced_sample_never_exceeds_target_nor_multiplier(multiplier, sampling):
    tree = _two_level_tree([50, 3, 7, 20, 1], [0, 0, 1, 1, 1])
    for target in [0, 5, 30, 81, 150, 500]:
        sel = balanced_sample(tree, target, sampling=sampling, multiplier=multiplier, seed=1)
        assert len(sel) <= target
        assert len(sel) == min(target, 81 * multiplier)
        assert np.bincount(sel).max(initial=0) <= multiplier


def test_closest_sampling_takes_members_nearest_the_centroid():
    tree = _two_level_tree([10], [0])
    sel = balanced_sample(tree, 3, sampling="closest")
    assert sorted(sel.tolist()) == sorted(np.argsort(tree.levels[0].distances)[:3].tolist())


def test_balanced_sampling_flattens_a_skewed_cluster_distribution():
    rng = np.random.default_rng(0)
    leaf_sizes = (2000 / np.arange(1, 41) ** 1.2).astype(int) + 5
    tree = _two_level_tree(leaf_sizes, rng.integers(0, 8, leaf_sizes.size).tolist())
    n = leaf_sizes.sum()
    sel = balanced_sample(tree, n // 4, seed=0)
    before = leaf_sizes / leaf_sizes.sum()
    after = np.bincount(tree.levels[0].assignment[sel], minlength=leaf_sizes.size) / len(sel)
    assert before.max() / np.median(before) > 20
    assert after.max() / np.median(after) < 0.5 * before.max() / np.median(before)


def test_hierarchical_sampling_on_real_clustering_stays_within_target():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (n, 2)) for c, n in [(0, 500), (3, 50), (6, 20)]]).astype(np.float32)
    tree = hierarchical_kmeans(x, [12, 3], [2, 2], [5, 2], n_iters=10, seed=0)
    sel = balanced_sample(tree, 90, seed=0)
    assert len(sel) == 90 and len(np.unique(sel)) == 90
    blob = np.where(sel < 500, 0, np.where(sel < 550, 1, 2))
    # a uniform sample would give the big blob ~79%; balanced sampling gives it far less
    assert (blob == 0).mean() < 0.6
