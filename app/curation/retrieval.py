"""Self-supervised retrieval of pool images near curated seed sets (DINOv2 §3, App. A.4), from
the description in reference/curation.md §1.5.

Sample-based (large seed sets): each seed image takes its k nearest pool images; an image found
by several seeds is a "collision" and is kept once (the count is reported).
Cluster-based (small seed sets): the pool is clustered (k-means); every cluster receiving more
than `cluster_hits_min` seed images contributes up to `images_per_cluster` pool images (all of
a smaller cluster; a random subset of a larger one). The union is capped at `per_set_cap` by a
uniform random subsample (the paper's literal reading: cap after retrieval).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.curation import knn


@dataclass
class RetrievalResult:
    indices: np.ndarray  # sorted unique pool indices retrieved, int64
    mode: str  # "sample" | "cluster"
    stats: dict


def sample_based(pool_index_or_emb, seed_emb: np.ndarray, k: int = 4, **index_kwargs) -> RetrievalResult:
    """k nearest pool images per seed (inner product on normalised embeddings).
    pool_index_or_emb: a faiss index or [N, D] pool embeddings; seed_emb [Q, D]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _, I = knn.search(pool_index_or_emb, seed_emb, k, **index_kwargs)
    found = I[I >= 0]
    uniq, counts = np.unique(found, return_counts=True)
    stats = {"n_seeds": int(I.shape[0]), "k": k, "n_nominal": int(found.size),
             "n_retrieved": int(uniq.size), "n_collisions": int(found.size - uniq.size),
             "collision_rate": float(1 - uniq.size / found.size) if found.size else 0.0,
             "max_hits_per_image": int(counts.max()) if counts.size else 0}
    return RetrievalResult(uniq.astype(np.int64), "sample", stats)


def cluster_based(pool_clusters: np.ndarray, seed_clusters: np.ndarray, cluster_hits_min: int = 3,
                  images_per_cluster: int = 10_000, per_set_cap: int = 1_000_000,
                  seed: int = 0) -> RetrievalResult:
    """pool_clusters [N] and seed_clusters [Q]: cluster id of each pool / seed image (same
    k-means). Returns the pool images of clusters hit by more than cluster_hits_min seeds."""
    pool_clusters = np.asarray(pool_clusters, dtype=np.int64)
    seed_clusters = np.asarray(seed_clusters, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_clusters = int(max(pool_clusters.max(initial=-1), seed_clusters.max(initial=-1))) + 1
    hits = np.bincount(seed_clusters, minlength=n_clusters)
    chosen = np.flatnonzero(hits > cluster_hits_min)
    order = np.argsort(pool_clusters, kind="stable")
    bounds = np.searchsorted(pool_clusters[order], np.arange(n_clusters + 1))
    parts = []
    for c in chosen:
        members = order[bounds[c]:bounds[c + 1]]
        if members.size > images_per_cluster:
            members = rng.choice(members, images_per_cluster, replace=False)
        parts.append(members)
    picked = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    n_before_cap = int(picked.size)
    if picked.size > per_set_cap:
        picked = np.sort(rng.choice(picked, per_set_cap, replace=False))
    stats = {"n_seeds": int(seed_clusters.size), "n_clusters_hit": int((hits > 0).sum()),
             "n_clusters_selected": int(chosen.size), "n_nominal": int(chosen.size * images_per_cluster),
             "n_before_cap": n_before_cap, "n_retrieved": int(picked.size),
             "capped": bool(n_before_cap > per_set_cap)}
    return RetrievalResult(picked.astype(np.int64), "cluster", stats)


def retrieve(pool_emb: np.ndarray, seed_emb: np.ndarray, pool_clusters: np.ndarray | None,
             centroids: np.ndarray | None, k: int = 4, cluster_hits_min: int = 3,
             images_per_cluster: int = 10_000, per_set_cap: int = 1_000_000,
             sample_based_min_size: int = 1_000_000, seed: int = 0, pool_index=None,
             **index_kwargs) -> RetrievalResult:
    """Pick the mode by seed-set size (>= sample_based_min_size: sample-based) and run it.
    Cluster-based needs pool_clusters [N] and centroids [K, D] of the pool k-means."""
    if len(seed_emb) >= sample_based_min_size:
        return sample_based(pool_index if pool_index is not None else pool_emb, seed_emb, k, **index_kwargs)
    if pool_clusters is None or centroids is None:
        raise ValueError("cluster-based retrieval needs the pool clustering (pool_clusters, centroids)")
    from app.curation.kmeans import assign

    seed_clusters, _ = assign(knn.as_float32(seed_emb, "seed embeddings"), centroids)
    return cluster_based(pool_clusters, seed_clusters, cluster_hits_min, images_per_cluster,
                         per_set_cap, seed)
