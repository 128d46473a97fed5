"""Stages dedup, retrieve and cluster: read embeddings from the run tree, call the pure
algorithms, write arrays + a `_SUCCESS` summary.

dedup and cluster run on every rank (`Comm`): dedup splits the k-NN queries (pool rows and eval
images) over ranks against one shared partition, each rank writes its edges as a part that a
rerun reuses, and rank 0 merges them with union-find; cluster runs the first (large) level of
the hierarchical k-means data-parallel and the small upper levels and the sampling on rank 0.
retrieve runs on rank 0 (seed sets are small next to the pool) while the other ranks wait.

Row ids everywhere are positions in the pool's embedded order (`embeddings/pool`, shard order).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from app import storage
from app.curation import dedup, knn, retrieval
from app.curation.artifacts import CurationRun, set_name
from app.curation.cell_index import train_cells
from app.curation.comm import Comm
from app.curation.embed import load_set, uses_copy_head
from app.curation.kmeans import hierarchical_kmeans, hierarchical_kmeans_distributed, kmeans
from app.curation.sampling import balanced_sample

log = logging.getLogger(__name__)


def _index_kwargs(cfg: Any) -> dict[str, Any]:
    d = cfg.curation.dedup
    return {"index": d.index, "nlist": d.nlist, "nprobe": d.nprobe, "exact_below": d.exact_below,
            "hnsw_m": d.hnsw_m, "ef_search": d.ef_search}


def _shared_centroids(run: CurationRun, emb: np.ndarray, pool_print: str, cfg: Any,
                      comm: Comm) -> np.ndarray | None:
    """With several ranks and the `cells` index: the partition rank 0 trained (kept in the run
    tree, so a resumed attempt searches the same cells), identical on every rank. Collective."""
    kw = _index_kwargs(cfg)
    if not comm.distributed or knn.resolve_kind(kw["index"], len(emb), kw["exact_below"]) != "cells":
        return None
    uri = "dedup/parts/cells.npz"
    sig = _signature(pool=pool_print, nlist=kw["nlist"], seed=cfg.run.seed)
    if comm.rank == 0 and not _part_matches(run, uri, sig):
        run.put_arrays(uri, centroids=train_cells(emb, kw["nlist"], seed=cfg.run.seed),
                       signature=np.array(sig))
    comm.barrier()
    return run.get_arrays(uri)["centroids"]


def _signature(**params: Any) -> str:
    import json

    return json.dumps(params, sort_keys=True, default=str)


def _fingerprint(a: np.ndarray) -> str:
    """Shape + hash of about a thousand evenly spaced rows: tells re-embedded inputs apart."""
    import hashlib

    sample = np.ascontiguousarray(a[:: max(1, len(a) // 1000)])
    return f"{a.shape}:{hashlib.sha1(sample.tobytes()).hexdigest()[:16]}"


def _part_matches(run: CurationRun, relpath: str, signature: str) -> bool:
    """A part from an earlier attempt is reused only if it was made with the same inputs."""
    if not storage.exists(run.uri(relpath)):
        return False
    return str(run.get_arrays(relpath).get("signature", "")) == signature


def _dedup_part(run: CurationRun, cfg: Any, comm: Comm, emb: np.ndarray,
                evals: np.ndarray) -> None:
    """This rank's share of the searches: thresholded edges of its pool rows and the pool
    images its eval rows match. Written once; a rerun after a kill reuses finished parts."""
    d = cfg.curation.dedup
    part = f"dedup/parts/rank{comm.rank:05d}-of-{comm.world:05d}.npz"
    pool_print = _fingerprint(emb)
    centroids = _shared_centroids(run, emb, pool_print, cfg, comm)
    kw = _index_kwargs(cfg)
    sig = _signature(pool=pool_print, evals=_fingerprint(evals), k=d.k, threshold=d.threshold,
                     eval_threshold=d.eval_threshold, seed=cfg.run.seed, **kw)
    if _part_matches(run, part, sig):
        log.info("dedup rank %d: part from an earlier attempt found, reusing it", comm.rank)
        return
    t0 = time.time()
    if centroids is not None:
        kw.update(index="cells", centroids=centroids)
    index = knn.build_index(emb, seed=cfg.run.seed, **kw)
    rows = comm.rows(len(emb))
    ei, ej = dedup.self_edges(emb, d.k, d.threshold, rows=rows, index_obj=index)
    eval_rows = comm.rows(len(evals))
    matched, n_hit = dedup.eval_matches(index, evals[eval_rows], d.eval_threshold, d.k)
    run.put_arrays(part, ei=ei, ej=ej, matched=matched, n_eval_hit=np.array([n_hit]),
                   signature=np.array(sig))
    log.info("dedup rank %d/%d: %d pool rows, %d eval rows -> %d edges, %d eval matches in %.1fs",
             comm.rank, comm.world, rows.stop - rows.start, eval_rows.stop - eval_rows.start,
             ei.size, matched.size, time.time() - t0)


def run_dedup(run: CurationRun, cfg: Any, comm: Comm | None = None) -> dict[str, Any] | None:
    comm = comm or Comm()
    c, d = cfg.curation, cfg.curation.dedup
    t0 = time.time()
    pool = load_set(run, "pool", c.pool)
    field = "copy" if uses_copy_head(cfg) else "embeddings"
    eval_sets = [load_set(run, set_name("eval", i, u), u) for i, u in enumerate(c.eval_sets)]
    named = [("pool", pool)] + [(set_name("eval", i, u), e)
                                for i, (u, e) in enumerate(zip(c.eval_sets, eval_sets))]
    for name, data in named:
        if field not in data and len(data["keys"]):
            from app.config import ConfigError

            raise ConfigError(f"dedup: embeddings/{name} has no copy-head descriptors (embedded "
                             "with curation.dedup.descriptor=embedding?); rerun `curate embed "
                             "--force` or set curation.dedup.descriptor=embedding")
    emb = pool.get(field, pool["embeddings"])
    eval_sets = [e.get(field, e["embeddings"]) for e in eval_sets]
    evals = (np.concatenate(eval_sets) if eval_sets else np.zeros((0, emb.shape[1]), np.float32))
    if len(emb):
        _dedup_part(run, cfg, comm, emb, evals)
    comm.barrier()
    if comm.rank != 0:
        return None
    parts = [run.get_arrays(f"dedup/parts/rank{r:05d}-of-{comm.world:05d}.npz")
             for r in range(comm.world)] if len(emb) else []
    ei = np.concatenate([p["ei"] for p in parts]) if parts else np.zeros(0, np.int64)
    ej = np.concatenate([p["ej"] for p in parts]) if parts else np.zeros(0, np.int64)
    if d.phash_prefilter:
        hi, hj = dedup.hash_groups(pool["phash"])
        ei, ej = np.concatenate([ei, hi]), np.concatenate([ej, hj])
    res = dedup.components_from_edges(emb, ei, ej, d.representative) if len(emb) else \
        dedup.SelfDedupResult(np.zeros(0, np.int64), np.zeros(0, bool), 0, {"n": 0, "n_kept": 0})
    drop = np.zeros(len(pool["keys"]), bool)
    rel_stats: dict[str, Any] = {}
    if eval_sets and len(emb):
        matched = np.unique(np.concatenate([p["matched"] for p in parts]))
        rel = dedup.drop_matched_components(res.components, matched, len(evals),
                                            sum(int(p["n_eval_hit"][0]) for p in parts))
        drop, rel_stats = rel.drop, rel.stats
    kept = res.keep & ~drop
    run.put_arrays("dedup/dedup.npz", components=res.components, self_keep=res.keep,
                   eval_drop=drop, kept=kept)
    summary = {"stage": "dedup", "n_pool": int(len(pool["keys"])), "self": res.stats,
               "relative": rel_stats, "n_kept": int(kept.sum()), "world_size": comm.world,
               "index": knn.resolve_kind(d.index, len(emb), d.exact_below), "descriptor": field,
               "phash_prefilter": bool(d.phash_prefilter), "seconds": round(time.time() - t0, 2)}
    run.mark_done("dedup", summary)
    log.info("dedup: %d -> %d (self) -> %d (relative to %d eval sets)", summary["n_pool"],
             res.stats["n_kept"], summary["n_kept"], len(eval_sets))
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


def run_cluster(run: CurationRun, cfg: Any, comm: Comm | None = None) -> dict[str, Any] | None:
    comm = comm or Comm()
    k = cfg.curation.cluster
    t0 = time.time()
    ids, emb = _pool_kept(run, cfg)
    n_clusters, n_in = [], len(ids)
    for want in k.n_clusters:  # small pools: never more clusters than points at a level
        n_clusters.append(max(1, min(want, n_in)))
        n_in = n_clusters[-1]
    args = dict(n_clusters=n_clusters, n_resampling_steps=k.n_resampling_steps,
                sample_size=k.sample_size, n_iters=k.n_iters, init=k.init, seed=cfg.run.seed,
                strategy=k.resample_strategy)
    if comm.distributed:
        tree = hierarchical_kmeans_distributed(emb[comm.rows(len(emb))], comm, **args)
        if tree is None:
            return None
    else:
        tree = hierarchical_kmeans(emb, **args)
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
               "world_size": comm.world,
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


