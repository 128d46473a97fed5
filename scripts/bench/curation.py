"""Benchmark the curation algorithms; prints one JSON object.

(a) the self-dedup k-NN graph (k=64) over N x D clustered, L2-normalised vectors, with recall@k
    measured against exact search on a query sample, for each index setting in --knn;
(b) hierarchical k-means with resampling, and balanced sampling, on the same vectors.

    OMP_NUM_THREADS=2 python scripts/bench/curation.py --n 100000
    python scripts/bench/curation.py --n 1000000 --knn hnsw:m=32,efc=40,efs=96 ivf:nlist=4096,nprobe=16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from app.curation import knn  # noqa: E402
from app.curation.kmeans import hierarchical_kmeans  # noqa: E402
from app.curation.sampling import balanced_sample  # noqa: E402


def gaussian_mixture(n: int, dim: int, n_modes: int, seed: int) -> np.ndarray:
    """Normalised Gaussian mixture with Zipf-like mode weights (web data is skewed)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_modes, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, n_modes + 1) ** 0.8
    modes = rng.choice(n_modes, n, p=weights / weights.sum())
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        x[s:e] = centers[modes[s:e]] + 0.6 * rng.standard_normal((e - s, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def parse_setting(text: str) -> tuple[str, dict]:
    kind, _, rest = text.partition(":")
    names = {"m": "hnsw_m", "efc": "ef_construction", "efs": "ef_search", "nlist": "nlist",
             "nprobe": "nprobe", "train": "train_size"}
    kwargs = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        kwargs[names[key]] = int(value)
    return kind, kwargs


def bench_knn(x, k, settings, n_queries, seed):
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(x.shape[0], min(n_queries, x.shape[0]), replace=False))
    t0 = time.time()
    _, I_exact = knn.search(knn.build_index(x, index="flat"), x[qids], k)
    exact_s = time.time() - t0
    out = {"exact_sample_s": round(exact_s, 1), "exact_full_graph_est_s": round(exact_s * x.shape[0] / len(qids), 1), "runs": []}
    for text in settings:
        kind, kwargs = parse_setting(text)
        t0, c0 = time.time(), time.process_time()
        idx = knn.build_index(x, index=kind, exact_below=0, **kwargs)
        build_s, build_cpu = time.time() - t0, time.process_time() - c0
        t1, c1 = time.time(), time.process_time()
        _, I = knn.search(idx, x, k)
        search_s, search_cpu = time.time() - t1, time.process_time() - c1
        rec = knn.recall_at_k(I[qids], I_exact, k)
        # CPU seconds as well as wall time: on a shared machine wall time mostly measures load.
        run = {"setting": text, "build_s": round(build_s, 1), "search_s": round(search_s, 1),
               "graph_s": round(build_s + search_s, 1), "graph_cpu_s": round(build_cpu + search_cpu, 1),
               f"recall@{k}": round(rec, 4)}
        print(json.dumps(run), file=sys.stderr, flush=True)
        out["runs"].append(run)
        del idx, I
    return out


def bench_hkmeans(x, levels, resampling, sample_size, n_iters, init, target, seed):
    t0, c0 = time.time(), time.process_time()
    tree = hierarchical_kmeans(x, n_clusters=levels, n_resampling_steps=resampling,
                               sample_size=sample_size, n_iters=n_iters, init=init, seed=seed)
    hk_s, hk_cpu = time.time() - t0, time.process_time() - c0
    t1 = time.time()
    sel = balanced_sample(tree, target, sampling="random", seed=seed)
    bs_s = time.time() - t1
    out = {"levels": levels, "n_resampling_steps": resampling, "sample_size": sample_size,
           "n_iters": n_iters, "init": init, "hkmeans_s": round(hk_s, 1), "hkmeans_cpu_s": round(hk_cpu, 1),
           "balanced_sample_s": round(bs_s, 2), "target": target, "selected": int(len(sel))}
    # Cluster sizes per level, of the whole input and of the selection. Balanced sampling
    # equalises top-down: the top level first, then the children inside each parent.
    point_cluster = tree.levels[0].assignment
    for lv, level in enumerate(tree.levels):
        if lv:
            point_cluster = level.assignment[point_cluster]
        k = level.centroids.shape[0]
        for name, ids in (("before", point_cluster), ("after", point_cluster[sel])):
            sizes = np.bincount(ids, minlength=k)
            out[f"level{lv}_{name}"] = cluster_spread(sizes)
    return out


def cluster_spread(sizes: np.ndarray) -> dict:
    """max/median size, share held by the largest 10% of clusters, and normalised entropy
    (1 = all clusters the same size) of a cluster-size vector."""
    p = sizes / max(1, sizes.sum())
    nz = p[p > 0]
    top = np.sort(sizes)[::-1][:max(1, len(sizes) // 10)].sum() / max(1, sizes.sum())
    return {"max_over_median": round(float(sizes.max() / max(1, np.median(sizes))), 2),
            "top10pct_share": round(float(top), 3),
            "entropy_norm": round(float(-(nz * np.log(nz)).sum() / np.log(len(sizes))), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--modes", type=int, default=0, help="mixture modes (0: n/100)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--queries", type=int, default=10_000, help="queries for the exact recall check")
    p.add_argument("--knn", nargs="*", default=["hnsw:m=32,efc=40,efs=96"],
                   help="index settings kind:key=val,... (kinds: flat ivf ivfsq8 hnsw)")
    p.add_argument("--levels", type=int, nargs="*", default=None, help="k per level (default n/100, n/1000)")
    p.add_argument("--resampling", type=int, nargs="*", default=None)
    p.add_argument("--sample-size", type=int, nargs="*", default=None)
    p.add_argument("--n-iters", type=int, default=10)
    p.add_argument("--init", default="kmeans++")
    p.add_argument("--skip-kmeans", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    faiss.omp_set_num_threads(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.time()
    x = gaussian_mixture(a.n, a.dim, a.modes or max(10, a.n // 100), a.seed)
    result = {"n": a.n, "dim": a.dim, "threads": a.threads, "gpus": knn.num_gpus(),
              "load_avg_1m_at_start": round(os.getloadavg()[0], 1), "data_s": round(time.time() - t0, 1)}
    if a.knn:
        result["knn_graph"] = bench_knn(x, a.k, a.knn, a.queries, a.seed)
    if not a.skip_kmeans:
        levels = a.levels or [max(2, a.n // 2000), max(2, a.n // 20000)]
        resampling = a.resampling or [2] * len(levels)
        sample_size = a.sample_size or [max(2, (n_in // k) // 2) for n_in, k in zip([a.n] + levels[:-1], levels)]
        result["hierarchical_kmeans"] = bench_hkmeans(x, levels, resampling, sample_size, a.n_iters,
                                                      a.init, a.n // 10, a.seed)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
