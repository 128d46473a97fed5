"""Stages dedup, retrieve and cluster: read embeddings from the run tree, call the pure
algorithms, write arrays + a `_SUCCESS` summary. They run on one rank (faiss and torch use all
local cores / the GPU); `run.py` makes the other ranks wait.

Row ids everywhere are positions in the pool's embedded order (`embeddings/pool`, shard order).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from app.curation import dedup, retrieval
from app.curation.artifacts import CurationRun, set_name
from app.curation.embed import load_set
from app.curation.kmeans import hierarchical_kmeans, kmeans
from app.curation.sampling import balanced_sample

log = logging.getLogger(__name__)


def _index_kwargs(cfg: Any) -> dict[str, Any]:
    d = cfg.curation.dedup
    return {"index": d.index, "nlist": d.nlist, "nprobe": d.nprobe, "exact_below": d.exact_below,
            "hnsw_m": d.hnsw_m, "ef_search": d.ef_search}


def run_dedup(run: CurationRun, cfg: Any) -> dict[str, Any]:
    c, d = cfg.curation, cfg.curation.dedup
    t0 = time.time()
    pool = load_set(run, "pool", c.pool)
    extra = dedup.hash_groups(pool["phash"]) if d.phash_prefilter else None
    res = dedup.self_dedup(pool["embeddings"], k=d.k, threshold=d.threshold,
                           representative=d.representative, extra_edges=extra, **_index_kwargs(cfg))
    drop = np.zeros(len(pool["keys"]), bool)
    rel_stats: dict[str, Any] = {}
    evals = [load_set(run, set_name("eval", i, u), u)["embeddings"] for i, u in enumerate(c.eval_sets)]
    if evals and len(pool["keys"]):
        rel = dedup.relative_dedup(pool["embeddings"], res.components, np.concatenate(evals),
                                   threshold=d.eval_threshold, k=d.k, **_index_kwargs(cfg))
        drop, rel_stats = rel.drop, rel.stats
    kept = res.keep & ~drop
    run.put_arrays("dedup/dedup.npz", components=res.components, self_keep=res.keep,
                   eval_drop=drop, kept=kept)
    summary = {"stage": "dedup", "n_pool": int(len(pool["keys"])), "self": res.stats,
               "relative": rel_stats, "n_kept": int(kept.sum()),
               "phash_prefilter": bool(d.phash_prefilter), "seconds": round(time.time() - t0, 2)}
    run.mark_done("dedup", summary)
    log.info("dedup: %d -> %d (self) -> %d (relative to %d eval sets)", summary["n_pool"],
             res.stats["n_kept"], summary["n_kept"], len(evals))
    return summary


def _pool_kept(run: CurationRun, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    pool = load_set(run, "pool", cfg.curation.pool)
    if run.done("dedup"):
        ids = np.flatnonzero(run.get_arrays("dedup/dedup.npz")["kept"])
    else:
        ids = np.arange(len(pool["keys"]))
    return ids, pool["embeddings"][ids]


def run_retrieve(run: CurationRun, cfg: Any) -> dict[str, Any]:
    c, r = cfg.curation, cfg.curation.retrieve
    t0 = time.time()
    ids, emb = _pool_kept(run, cfg)
    seeds = [(set_name("seed", i, u), load_set(run, set_name("seed", i, u), u)["embeddings"])
             for i, u in enumerate(c.seeds)]
    need_clusters = any(len(e) < r.sample_based_min_size for _, e in seeds)
    pool_clusters = centroids = None
    if need_clusters and len(ids):
        k = min(r.n_clusters, len(ids))
        km = kmeans(emb, k, n_iters=r.n_iters, init=c.cluster.init, seed=cfg.run.seed)
        pool_clusters, centroids = km.labels, km.centroids
        run.put_arrays("retrieval/pool_kmeans.npz", centroids=centroids, labels=pool_clusters)
    sets = {}
    for name, seed_emb in seeds:
        res = retrieval.retrieve(emb, seed_emb, pool_clusters, centroids, k=r.k,
                                 cluster_hits_min=r.cluster_hits_min,
                                 images_per_cluster=r.images_per_cluster, per_set_cap=r.per_set_cap,
                                 sample_based_min_size=r.sample_based_min_size, seed=cfg.run.seed,
                                 **_index_kwargs(cfg))
        pool_rows = ids[res.indices]
        run.put_arrays(f"retrieval/{name}.npz", pool_rows=pool_rows)
        sets[name] = {"mode": res.mode, **res.stats}
        log.info("retrieve %s: %s-based, %d pool images", name, res.mode, len(pool_rows))
    summary = {"stage": "retrieve", "n_pool_searched": int(len(ids)), "sets": sets,
               "seconds": round(time.time() - t0, 2)}
    run.mark_done("retrieval", summary)
    return summary


def run_cluster(run: CurationRun, cfg: Any) -> dict[str, Any]:
    k = cfg.curation.cluster
    t0 = time.time()
    ids, emb = _pool_kept(run, cfg)
    n_clusters, n_in = [], len(ids)
    for want in k.n_clusters:  # small pools: never more clusters than points at a level
        n_clusters.append(max(1, min(want, n_in)))
        n_in = n_clusters[-1]
    tree = hierarchical_kmeans(emb, n_clusters, k.n_resampling_steps, k.sample_size, n_iters=k.n_iters,
                               init=k.init, seed=cfg.run.seed, strategy=k.resample_strategy)
    for lv, level in enumerate(tree.levels):
        run.put_arrays(f"clusters/level{lv}.npz", centroids=level.centroids,
                       assignment=level.assignment, distances=level.distances)
    if k.target_size > 0:
        sel = balanced_sample(tree, k.target_size, sampling=k.sampling, multiplier=k.multiplier,
                              seed=cfg.run.seed)
    else:
        sel = np.arange(len(ids))
    run.put_arrays("clusters/selection.npz", pool_rows=ids[sel])
    leaf_before = np.bincount(tree.levels[0].assignment, minlength=tree.levels[0].centroids.shape[0])
    leaf_after = np.bincount(tree.levels[0].assignment[sel], minlength=leaf_before.shape[0])
    summary = {"stage": "cluster", "n_input": int(len(ids)), "n_clusters": n_clusters,
               "n_selected": int(len(sel)), "n_unique_selected": int(len(np.unique(sel))),
               "leaf_sizes_before": leaf_before.tolist(), "leaf_sizes_after": leaf_after.tolist(),
               "seconds": round(time.time() - t0, 2)}
    run.mark_done("clusters", summary)
    log.info("cluster: %d points -> levels %s, %d selected", len(ids), n_clusters, len(sel))
    return summary


def leaf_cluster_of_pool(run: CurationRun, n_pool: int) -> np.ndarray:
    """[n_pool] leaf cluster id per pool row (-1 where not clustered)."""
    out = np.full(n_pool, -1, np.int64)
    if run.done("clusters"):
        ids = np.flatnonzero(run.get_arrays("dedup/dedup.npz")["kept"]) if run.done("dedup") else np.arange(n_pool)
        out[ids] = run.get_arrays("clusters/level0.npz")["assignment"]
    return out


