"""k-means and hierarchical k-means with resampling (Vo et al. 2024), implemented from the paper
description in reference/curation.md §2.3.

Distance is squared Euclidean throughout (the reference's choice). Centroids are plain means and
are NOT re-normalised ("non-spherical"); for L2-normalised inputs the nearest centroid by L2 is
the most similar by cosine up to the centroid-norm term, which is what the reference does too.
`init="faiss"` hands the whole fit to `faiss.Kmeans(spherical=False)` with subsampling disabled
(its init is k random points, and empty clusters are split); the other inits run our own Lloyd
loop in torch (GPU when available), where empty clusters keep their previous centroid.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

INITS = ("kmeans++", "random", "faiss")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def _threads_for(work: float):
    """One intra-op thread for small problems: torch's OpenMP start-up costs ~10 ms per op on a
    busy CPU, hundreds of times the op itself, which made tiny k-means take seconds."""
    before = torch.get_num_threads()
    if work < 5e7 and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunk(n_centroids: int, budget: float = 5e7) -> int:
    """Rows per chunk so one [chunk, K] distance block stays ~budget floats."""
    return max(256, int(budget // max(1, n_centroids)))


def assign(x, centroids, chunk_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: x [N, D], centroids [K, D] -> (labels [N] int64,
    squared distances [N] float32)."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    ct = torch.as_tensor(np.asarray(centroids, dtype=np.float32)).to(_device())
    with _threads_for(float(xt.shape[0]) * ct.shape[0] * max(1, xt.shape[1])):
        labels, dists = _assign_t(xt, ct, chunk_size or _chunk(ct.shape[0]))
    return labels.cpu().numpy(), dists.cpu().numpy()


def _assign_t(x: torch.Tensor, c: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    c_sq = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.int64)
    dists = torch.empty(x.shape[0], dtype=torch.float32)
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk].to(c.device, torch.float32)
        d = c_sq[None, :] - 2.0 * (xb @ c.T)  # ||x||^2 added below: argmin does not need it
        val, idx = d.min(1)
        labels[s:s + chunk] = idx.cpu()
        dists[s:s + chunk] = (val + (xb * xb).sum(1)).clamp_min_(0).cpu()
    return labels, dists


def kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with greedy local trials (2 + floor(ln k) candidates per centre, keep
    the one that lowers the potential most); potentials accumulate in float64.
    x [N, D] -> centres [k, D]. Buffers are allocated once: at 1M points a fresh [trials, N]
    float64 block per centre made the page faults cost more than the arithmetic."""
    n = x.shape[0]
    dev = _device()
    xd = x.to(dev, torch.float32)
    x_sq = (xd * xd).sum(1)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [xd[first]]
    closest = ((xd - xd[first]) ** 2).sum(1).double()
    cum = torch.empty_like(closest)
    d32 = torch.empty(trials, n, dtype=torch.float32, device=dev)
    cand_closest = torch.empty(trials, n, dtype=torch.float64, device=dev)
    for _ in range(1, k):
        torch.cumsum(closest, 0, out=cum)
        r = torch.rand(trials, generator=gen, dtype=torch.float64).to(dev) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
        cx = xd[cand]
        # squared distances of every point to each candidate: |c|^2 + |x|^2 - 2 c.x
        torch.mm(cx, xd.T, out=d32)
        d32.mul_(-2.0).add_(x_sq[None, :]).add_((cx * cx).sum(1)[:, None]).clamp_(min=0.0)
        cand_closest.copy_(d32)
        torch.minimum(cand_closest, closest[None, :], out=cand_closest)
        best = int(cand_closest.sum(1).argmin())
        closest.copy_(cand_closest[best])
        centres.append(xd[cand[best]])
    return torch.stack(centres)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # [K, D] float32
    labels: np.ndarray  # [N] int64
    distances: np.ndarray  # [N] float32 squared distance to the assigned centroid
    objective: list[float] = field(default_factory=list)  # sum of squared distances per iteration


def kmeans(x: np.ndarray, k: int, n_iters: int = 50, init: str = "kmeans++", seed: int = 0,
           chunk_size: int = 0) -> KMeansResult:
    """Lloyd's k-means of x [N, D] into k clusters (see module docstring for the variants)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (number of points), got {k}")
    if init == "faiss":
        return _kmeans_faiss(x, k, n_iters, seed)
    with _threads_for(float(n) * k * d):
        return _lloyd(x, k, n_iters, init, seed, chunk_size)


def _lloyd(x: np.ndarray, k: int, n_iters: int, init: str, seed: int, chunk_size: int) -> KMeansResult:
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x)
    chunk = chunk_size or _chunk(k)
    t0 = time.time()
    if init == "random":
        c = xt[torch.randperm(n, generator=gen)[:k]].to(_device())
    else:
        c = kmeans_plusplus(xt, k, gen)
    log.debug("%s init of %d centres on %d points: %.1fs", init, k, n, time.time() - t0)
    return _lloyd_iterations(xt, c, n_iters, chunk)


def _lloyd_iterations(xt: torch.Tensor, c: torch.Tensor, n_iters: int, chunk: int,
                      comm=None) -> KMeansResult:
    """n_iters Lloyd steps from centroids c over the rows xt; with a `Comm` the per-cluster
    float64 sums and counts (and the objective) are all-reduced, so every rank holds the same
    centroids while labelling only its own rows. Empty clusters keep their centroid."""
    k, d = c.shape
    objective = []
    labels, dists = _assign_t(xt, c, chunk)
    for _ in range(n_iters):
        sums = torch.zeros(k, d, dtype=torch.float64)
        for s in range(0, xt.shape[0], chunk):
            sums.index_add_(0, labels[s:s + chunk], xt[s:s + chunk].double())
        counts = torch.bincount(labels, minlength=k).double()
        if comm is not None:
            comm.allreduce_sum(sums)
            comm.allreduce_sum(counts)
        nonempty = counts > 0
        new_c = c.cpu().double().clone()
        new_c[nonempty] = sums[nonempty] / counts[nonempty, None]
        c = new_c.float().to(c.device)
        labels, dists = _assign_t(xt, c, chunk)
        total = dists.double().sum().reshape(1)
        if comm is not None:
            comm.allreduce_sum(total)
        objective.append(float(total[0]))
    return KMeansResult(c.cpu().numpy(), labels.numpy(), dists.numpy(), objective)


def _kmeans_faiss(x: np.ndarray, k: int, n_iters: int, seed: int) -> KMeansResult:
    import faiss

    from app.curation.knn import num_gpus

    km = faiss.Kmeans(x.shape[1], k, niter=max(1, n_iters), seed=seed, spherical=False,
                      gpu=num_gpus() > 0, max_points_per_centroid=x.shape[0] + 1,
                      min_points_per_centroid=1)
    km.train(x)
    D, I = km.index.search(x, 1)
    return KMeansResult(km.centroids.astype(np.float32), I[:, 0].astype(np.int64),
                        np.maximum(D[:, 0], 0).astype(np.float32), [float(o) for o in km.obj])


@dataclass
class Level:
    """One level of the tree: `assignment[i]` is the parent cluster of child i, where children
    are data points at level 0 and the previous level's clusters above it."""
    centroids: np.ndarray  # [K, D]
    assignment: np.ndarray  # [n_children] int64 in 0..K-1
    distances: np.ndarray  # [n_children] squared distance of each child to its centroid


@dataclass
class ClusterTree:
    levels: list[Level]  # levels[0] clusters the data; levels[-1] is the top

    @property
    def n_points(self) -> int:
        return int(self.levels[0].assignment.shape[0])

    def flat_sizes(self) -> list[np.ndarray]:
        """Number of data points under each cluster, per level."""
        sizes = []
        below = np.ones(self.n_points, dtype=np.int64)
        for lv in self.levels:
            below = np.bincount(lv.assignment, weights=below, minlength=lv.centroids.shape[0]).astype(np.int64)
            sizes.append(below)
        return sizes


def _select_for_resampling(labels: np.ndarray, dists: np.ndarray, k: int, r: int,
                           strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to r members per cluster: the r closest to the centroid ("closest") or
    r random ones ("random")."""
    key = dists if strategy == "closest" else rng.random(labels.shape[0])
    order = np.lexsort((key, labels))  # by cluster, then by key
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k))
    rank = np.arange(labels.shape[0]) - starts[sorted_labels]
    return np.sort(order[rank < r])


def resampled_kmeans(x: np.ndarray, k: int, n_resampling_steps: int, sample_size: int,
                     n_iters: int = 50, init: str = "kmeans++", seed: int = 0,
                     strategy: str = "closest") -> KMeansResult:
    """One level: k-means on x, then `n_resampling_steps` times re-run k-means (fresh init) on
    the `sample_size` members of each cluster selected by `strategy` and reassign all of x.
    Equal-size samples flatten the centroid density toward the data support (Vo et al.)."""
    res = kmeans(x, k, n_iters, init, seed)
    if sample_size <= 1:
        return res
    rng = np.random.default_rng(seed)
    for step in range(n_resampling_steps):
        idx = _select_for_resampling(res.labels, res.distances, k, sample_size, strategy, rng)
        sub = kmeans(x[idx], min(k, idx.shape[0]), n_iters, init, seed + step + 1)
        labels, dists = assign(x, sub.centroids)
        res = KMeansResult(sub.centroids, labels, dists, sub.objective)
    return res


def hierarchical_kmeans(x: np.ndarray, n_clusters: list[int], n_resampling_steps: list[int],
                        sample_size: list[int], n_iters: int = 50, init: str = "kmeans++",
                        seed: int = 0, strategy: str = "closest") -> ClusterTree:
    """Bottom-up hierarchical k-means: level 0 clusters x [N, D] into n_clusters[0]; each next
    level clusters the previous level's centroids. Per level, `n_resampling_steps[l]` resampling
    steps with `sample_size[l]` points per cluster (<= 1 disables resampling)."""
    n_levels = len(n_clusters)
    if not (len(n_resampling_steps) == len(sample_size) == n_levels) or n_levels == 0:
        raise ValueError("n_clusters, n_resampling_steps and sample_size must have the same, "
                         f"non-zero length; got {n_clusters}, {n_resampling_steps}, {sample_size}")
    levels: list[Level] = []
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    for lv in range(n_levels):
        if n_clusters[lv] > inputs.shape[0]:
            raise ValueError(f"n_clusters[{lv}]={n_clusters[lv]} exceeds the {inputs.shape[0]} "
                             "points at that level")
        t0 = time.time()
        res = resampled_kmeans(inputs, n_clusters[lv], n_resampling_steps[lv], sample_size[lv],
                               n_iters, init, seed + 1000 * lv, strategy)
        log.info("level %d: %d -> %d clusters in %.1fs", lv, inputs.shape[0], n_clusters[lv],
                 time.time() - t0)
        levels.append(Level(res.centroids, res.labels, res.distances))
        inputs = res.centroids
    return ClusterTree(levels)


# ---- data-parallel k-means over ranks ---------------------------------------------------------


def _init_sample(x_local: np.ndarray, k: int, comm, per_centroid: int, seed: int) -> np.ndarray:
    """The same random sample of about per_centroid * k rows (all rows if fewer) on every rank,
    each rank contributing in proportion to its rows."""
    counts = comm.gather(int(x_local.shape[0]))
    total = sum(counts)
    want = min(total, per_centroid * k)
    mine = int(round(want * x_local.shape[0] / max(total, 1)))
    rng = np.random.default_rng([seed, comm.rank])
    rows = np.sort(rng.choice(x_local.shape[0], min(mine, x_local.shape[0]), replace=False))
    return comm.concat(np.ascontiguousarray(x_local[rows], dtype=np.float32))


def kmeans_distributed(x_local: np.ndarray, k: int, comm, n_iters: int = 50,
                       init: str = "kmeans++", seed: int = 0, chunk_size: int = 0,
                       init_per_centroid: int = 128) -> KMeansResult:
    """Lloyd's k-means of the rows spread over ranks (this rank holds x_local). Rank 0 seeds
    the centroids on a shared sample of init_per_centroid * k rows (`init` as in `kmeans`) and
    broadcasts them; every iteration assigns locally and all-reduces per-cluster sums and counts
    in float64, so all ranks hold identical centroids. labels / distances are for x_local."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    x = np.ascontiguousarray(x_local, dtype=np.float32)
    d = x.shape[1]
    sample = _init_sample(x, k, comm, init_per_centroid, seed)
    if not 1 <= k <= sample.shape[0]:
        raise ValueError(f"k must be in 1..{sample.shape[0]} (number of points), got {k}")
    c0 = kmeans(sample, k, n_iters=0 if init != "faiss" else n_iters, init=init, seed=seed).centroids \
        if comm.rank == 0 else None
    c = torch.from_numpy(np.asarray(comm.broadcast(c0), dtype=np.float32)).to(_device())
    chunk = chunk_size or _chunk(k)
    with _threads_for(float(x.shape[0]) * k * d):
        return _lloyd_iterations(torch.from_numpy(x), c, n_iters, chunk, comm)


def resampled_kmeans_distributed(x_local: np.ndarray, k: int, comm, n_resampling_steps: int,
                                 sample_size: int, n_iters: int = 50, init: str = "kmeans++",
                                 seed: int = 0, strategy: str = "closest") -> KMeansResult:
    """`resampled_kmeans` over ranks: the selection of each cluster's sample_size members uses
    the gathered labels and distances (identical on every rank), the small resample is
    clustered on rank 0, and every rank reassigns its own rows to the broadcast centroids."""
    res = kmeans_distributed(x_local, k, comm, n_iters, init, seed)
    if sample_size <= 1:
        return res
    offsets = np.cumsum([0] + comm.gather(int(x_local.shape[0])))
    lo, hi = offsets[comm.rank], offsets[comm.rank + 1]
    rng = np.random.default_rng(seed)
    for step in range(n_resampling_steps):
        labels, dists = comm.concat(res.labels), comm.concat(res.distances)
        idx = _select_for_resampling(labels, dists, k, sample_size, strategy, rng)
        mine = idx[(idx >= lo) & (idx < hi)] - lo
        sub = comm.concat(np.ascontiguousarray(x_local[mine], dtype=np.float32))
        cents = (kmeans(sub, min(k, sub.shape[0]), n_iters, init, seed + step + 1).centroids
                 if comm.rank == 0 else None)
        cents = np.asarray(comm.broadcast(cents), dtype=np.float32)
        labels_l, dists_l = assign(x_local, cents)
        res = KMeansResult(cents, labels_l, dists_l, [])
    return res


def hierarchical_kmeans_distributed(x_local: np.ndarray, comm, n_clusters: list[int],
                                    n_resampling_steps: list[int], sample_size: list[int],
                                    n_iters: int = 50, init: str = "kmeans++", seed: int = 0,
                                    strategy: str = "closest") -> ClusterTree | None:
    """`hierarchical_kmeans` with the first level (all the data) data-parallel over ranks and
    the upper levels (centroids only: small) on rank 0. Returns the tree on rank 0, None on
    the other ranks."""
    if not (len(n_resampling_steps) == len(sample_size) == len(n_clusters)) or not n_clusters:
        raise ValueError("n_clusters, n_resampling_steps and sample_size must have the same, "
                         f"non-zero length; got {n_clusters}, {n_resampling_steps}, {sample_size}")
    t0 = time.time()
    res = resampled_kmeans_distributed(x_local, n_clusters[0], comm, n_resampling_steps[0],
                                       sample_size[0], n_iters, init, seed, strategy)
    labels, dists = comm.concat(res.labels), comm.concat(res.distances)
    log.info("level 0: %d -> %d clusters over %d ranks in %.1fs", labels.shape[0], n_clusters[0],
             comm.world, time.time() - t0)
    if comm.rank != 0:
        return None
    first = Level(res.centroids, labels, dists)
    if len(n_clusters) == 1:
        return ClusterTree([first])
    upper = hierarchical_kmeans(res.centroids, n_clusters[1:], n_resampling_steps[1:], sample_size[1:],
                                n_iters, init, seed + 1000, strategy)
    return ClusterTree([first] + upper.levels)
