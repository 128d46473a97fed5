import numpy as np

from app.curation import knn, retrieval


def test_sample_based_retrieves_k_neighbours_per_seed_and_counts_collisions():
    rng = np.random.default_rng(0)
    pool = knn.l2_normalize(rng.standard_normal((200, 16)))
    # seeds 0 and 1 are copies of the same pool image: their neighbour lists collide
    seeds = pool[[3, 3, 50]]
    res = retrieval.sample_based(pool, seeds, k=4, index="flat")
    assert res.stats["n_nominal"] == 12
    assert res.stats["n_collisions"] == 4
    assert res.stats["n_retrieved"] == len(res.indices) == 8
    assert {3, 50} <= set(res.indices.tolist())


def test_cluster_based_takes_clusters_with_more_than_min_hits_up_to_m_images():
    pool_clusters = np.repeat(np.arange(4), [30, 5, 30, 10])
    seed_clusters = np.array([0] * 4 + [1] * 5 + [2] * 3 + [3])  # hits 4, 5, 3, 1
    res = retrieval.cluster_based(pool_clusters, seed_clusters, cluster_hits_min=3,
                                  images_per_cluster=20, per_set_cap=1000, seed=0)
    got = pool_clusters[res.indices]
    assert (got == 0).sum() == 20 and (got == 1).sum() == 5 and not np.isin(got, [2, 3]).any()
    assert res.stats["n_clusters_selected"] == 2


def test_cluster_based_respects_per_set_cap():
    pool_clusters = np.repeat(np.arange(3), 50)
    seed_clusters = np.repeat(np.arange(3), 5)
    res = retrieval.cluster_based(pool_clusters, seed_clusters, 3, 40, per_set_cap=60, seed=1)
    assert len(res.indices) == 60 and len(np.unique(res.indices)) == 60
    assert res.stats["n_before_cap"] == 120 and res.stats["capped"]


def test_retrieve_chooses_mode_by_seed_set_size():
    rng = np.random.default_rng(1)
    pool = knn.l2_normalize(rng.standard_normal((100, 8)))
    centroids = pool[:5]
    from app.curation.kmeans import assign

    pool_clusters, _ = assign(pool, centroids)
    big = retrieval.retrieve(pool, pool[:20], pool_clusters, centroids, k=2, sample_based_min_size=10, index="flat")
    small = retrieval.retrieve(pool, pool[:5], pool_clusters, centroids, cluster_hits_min=0,
                               sample_based_min_size=10, index="flat")
    assert big.mode == "sample" and small.mode == "cluster"
