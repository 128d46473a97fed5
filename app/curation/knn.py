"""k-nearest-neighbour search and k-NN graphs over L2-normalised vectors (cosine = inner product).

Index choice (`index=`):
  flat   exact IndexFlatIP (GPU flat index when CUDA faiss is present);
  ivf    IVF-Flat, inner product, `nlist` lists (0: 4*sqrt(N)), `nprobe` lists probed;
  ivfsq8 IVF with 8-bit scalar quantisation (4x less memory, slightly lower recall);
  hnsw   IndexHNSWFlat (CPU only);
  cells  exact search inside the `nprobe` nearest of `nlist` k-means cells (0: sqrt(N)), one
         BLAS product per cell (app.curation.cell_index; the fastest high-recall CPU choice);
  auto   flat below `exact_below` vectors, else cells on CPU / ivf on GPU.
Numbers for these choices on the CI machine are in scripts/bench/curation.py's output.
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np

from app.curation.cell_index import CellIndex

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "ivf", "ivfsq8", "hnsw", "cells")


def num_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def as_float32(x: np.ndarray, name: str = "x") -> np.ndarray:
    """[N, D] C-contiguous float32 (fp16 embedding parts are upcast here)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of [N, D] (zero rows stay zero)."""
    x = as_float32(x).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _to_gpu(index):
    res = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(res, 0, index), res


def resolve_kind(index: str, n: int, exact_below: int = 200_000) -> str:
    """The concrete index kind `auto` means for n vectors on this machine."""
    if index != "auto":
        return index
    return "flat" if n < exact_below else ("ivf" if num_gpus() > 0 else "cells")


def build_index(xb: np.ndarray, index: str = "auto", nlist: int = 0, nprobe: int = 16,
                exact_below: int = 200_000, hnsw_m: int = 32, ef_search: int = 128,
                ef_construction: int = 80, train_size: int = 0, seed: int = 0,
                centroids: np.ndarray | None = None):
    """Build an inner-product faiss index over xb [N, D] float32; returns the index.

    train_size: vectors used to train IVF centroids (0: min(N, 64*nlist)).
    centroids: ready cell centroids for `cells` (another rank trained them); None: train here.
    """
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    xb = as_float32(xb, "index_vectors")
    n, d = xb.shape
    gpu = num_gpus() > 0
    kind = resolve_kind(index, n, exact_below)
    t0 = time.time()
    if kind == "cells":
        return CellIndex(xb, centroids=centroids, n_cells=nlist, nprobe=nprobe, seed=seed)
    if kind == "flat":
        idx = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = ef_construction
        idx.hnsw.efSearch = max(ef_search, 1)
    else:
        nl = nlist or max(1, int(4 * math.sqrt(n)))
        nl = min(nl, n)
        factory = f"IVF{nl},Flat" if kind == "ivf" else f"IVF{nl},SQ8"
        idx = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        ts = min(n, train_size or 64 * nl)
        rng = np.random.default_rng(seed)
        xt = xb if ts >= n else xb[np.sort(rng.choice(n, ts, replace=False))]
        if gpu:
            # Train the coarse quantizer (and codec) on the GPU: the slow part at scale.
            idx, res = _to_gpu(idx)
            idx._gpu_res = res  # keep the resources alive as long as the index
        idx.train(xt)
        if gpu:
            faiss.GpuParameterSpace().set_index_parameter(idx, "nprobe", nprobe)
        else:
            faiss.extract_index_ivf(idx).nprobe = nprobe
    if gpu and kind == "flat":
        idx, res = _to_gpu(idx)
        idx._gpu_res = res
    idx.add(xb)
    log.info("built %s index over %d x %d in %.1fs", kind, n, d, time.time() - t0)
    return idx


def search(index_or_vectors, queries: np.ndarray, k: int, batch_size: int = 16384,
           log_every_s: float = 30.0, **index_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search of queries [Q, D] -> (D [Q, k] float32, I [Q, k] int64).

    `index_or_vectors` is a faiss index or an [N, D] array (an index is built with
    `index_kwargs`). Missing neighbours (k > N) are I = -1, D = -inf.
    """
    index = index_or_vectors
    if isinstance(index_or_vectors, np.ndarray):
        index = build_index(index_or_vectors, **index_kwargs)
    queries = as_float32(queries, "queries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = queries.shape[0]
    if isinstance(index, CellIndex):  # groups queries by cell itself; bigger batches, bigger GEMMs
        batch_size = max(batch_size, index.query_block)
    D = np.empty((q, k), dtype=np.float32)
    I = np.empty((q, k), dtype=np.int64)
    t0 = last = time.time()
    for start in range(0, q, batch_size):
        stop = min(q, start + batch_size)
        D[start:stop], I[start:stop] = index.search(queries[start:stop], k)
        now = time.time()
        if now - last > log_every_s:
            last = now
            log.info("searched %d/%d queries (%.0f queries/s)", stop, q, stop / (now - t0))
    D[I < 0] = -np.inf
    return D, I


def knn_graph(x: np.ndarray, k: int, index: str = "auto", nlist: int = 0, nprobe: int = 16,
              exact_below: int = 200_000, batch_size: int = 16384, **index_kwargs
              ) -> tuple[np.ndarray, np.ndarray]:
    """k-NN graph of x [N, D] (L2-normalised) with itself: (D [N, k], I [N, k]).

    Row i lists i's k most similar vectors by inner product, usually including i itself at
    rank 0 (exact duplicates may come first instead); callers drop self-edges.
    """
    x = as_float32(x)
    idx = build_index(x, index=index, nlist=nlist, nprobe=nprobe, exact_below=exact_below,
                      **index_kwargs)
    return search(idx, x, min(k, x.shape[0]), batch_size=batch_size)


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of each row's exact top-k ids found in the approximate top-k ids.

    I_approx, I_exact: [Q, >=k] int64 neighbour ids for the same queries (-1 = missing).
    """
    I_approx, I_exact = np.asarray(I_approx), np.asarray(I_exact)
    if I_approx.shape[0] != I_exact.shape[0]:
        raise ValueError(f"row counts differ: {I_approx.shape[0]} vs {I_exact.shape[0]}")
    k = k or I_exact.shape[1]
    a, e = I_approx[:, :k], I_exact[:, :k]
    if a.size == 0:
        return 1.0
    # Row-wise set intersection via a sort: offset ids per row so rows never collide.
    n_rows = a.shape[0]
    base = (np.arange(n_rows, dtype=np.int64) * (max(a.max(), e.max()) + 2))[:, None]
    ea = (e + 1 + base)[e >= 0]
    aa = np.unique((a + 1 + base)[a >= 0])
    hits = np.isin(ea, aa).sum()
    valid = (e >= 0).sum()
    return float(hits / valid) if valid else 1.0
