"""Near-duplicate removal (DINOv2 App. A.3), from the description in reference/curation.md §1.4.

Self-dedup: k-NN graph over the pool, keep edges with cosine > threshold, group by connected
components (union-find), keep one representative per component. The representative is the
member with the lowest index ("lowest": stable under re-runs and cheap) or the member closest to
the component's mean embedding ("central"; ties: lower index).

Relative dedup: search every evaluation image among the pool; every pool component that holds a
pool image with cosine > eval_threshold to some evaluation image is dropped whole.

Component ids are returned, not just masks, so decisions can be revisited without a new search.
Optional exact-copy pre-filter: a 64-bit DCT perceptual hash (`phash`), identical hashes grouped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from app.curation import knn
from app.curation.union_find import connected_components

REPRESENTATIVES = ("lowest", "central")


@dataclass
class SelfDedupResult:
    components: np.ndarray  # [N] int64 component id = smallest member index
    keep: np.ndarray  # [N] bool, one True per component
    n_edges: int  # thresholded edges (i != j)
    stats: dict


def component_sizes(components: np.ndarray) -> np.ndarray:
    """[N] component ids -> size of the component each item is in, [N] int64."""
    _, inverse, counts = np.unique(components, return_inverse=True, return_counts=True)
    return counts[inverse]


def size_histogram(components: np.ndarray) -> dict[int, int]:
    """{component size: number of components of that size}."""
    _, counts = np.unique(components, return_counts=True)
    sizes, n = np.unique(counts, return_counts=True)
    return {int(s): int(c) for s, c in zip(sizes, n)}


def threshold_edges(D: np.ndarray, I: np.ndarray, threshold: float,
                    row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i, j) of a k-NN result (D, I [N, k], row i = query row_offset + i) with
    similarity > threshold, excluding self-edges and missing neighbours."""
    rows = np.broadcast_to(row_offset + np.arange(I.shape[0])[:, None], I.shape)
    mask = (D > threshold) & (I >= 0) & (I != rows)
    return rows[mask].astype(np.int64), I[mask].astype(np.int64)


def representatives(emb: np.ndarray, components: np.ndarray, rule: str = "lowest") -> np.ndarray:
    """keep mask [N] bool with one member per component chosen by `rule`."""
    if rule not in REPRESENTATIVES:
        raise ValueError(f"representative rule must be one of {REPRESENTATIVES}, got {rule!r}")
    n = components.shape[0]
    keep = np.zeros(n, dtype=bool)
    if rule == "lowest":
        keep[components == np.arange(n)] = True  # union-find labels by the smallest member
        return keep
    uniq, inv = np.unique(components, return_inverse=True)
    emb = knn.as_float32(emb, "embeddings")
    means = np.zeros((uniq.shape[0], emb.shape[1]), dtype=np.float64)
    np.add.at(means, inv, emb)
    sim = np.einsum("nd,nd->n", emb, means[inv].astype(np.float32))
    order = np.lexsort((np.arange(n), -sim, inv))  # per component: most central, then lowest id
    first = np.ones(n, dtype=bool)
    first[1:] = inv[order][1:] != inv[order][:-1]
    keep[order[first]] = True
    return keep


def self_edges(emb: np.ndarray, k: int = 64, threshold: float = 0.6, rows: slice | None = None,
               index_obj=None, **index_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Thresholded k-NN edges (i, j), cosine > threshold, i != j, of the query rows `rows`
    (default: all) of emb [N, D] against all of emb. `index_obj`: a prebuilt index over emb;
    otherwise one is built with `index_kwargs` (see knn.build_index)."""
    emb = knn.as_float32(emb, "embeddings")
    rows = rows if rows is not None else slice(0, emb.shape[0])
    start = rows.start or 0
    if index_obj is None:
        index_obj = knn.build_index(emb, **index_kwargs)
    D, I = knn.search(index_obj, emb[rows], min(k + 1, emb.shape[0]))  # +1: the self match
    ei, ej = threshold_edges(D, I, threshold, row_offset=start)
    return ei, ej


def components_from_edges(emb: np.ndarray, ei: np.ndarray, ej: np.ndarray,
                          representative: str = "lowest") -> SelfDedupResult:
    """Union-find components of the edges over the N rows of emb, one representative each."""
    n = emb.shape[0]
    components = connected_components(n, ei, ej)
    keep = representatives(emb, components, representative)
    hist = size_histogram(components)
    stats = {"n": n, "n_kept": int(keep.sum()), "n_removed": int(n - keep.sum()),
             "n_components": int(keep.sum()), "n_edges": int(ei.size),
             "largest_component": int(max(hist)), "component_size_histogram": hist}
    return SelfDedupResult(components, keep, int(ei.size), stats)


def self_dedup(emb: np.ndarray, k: int = 64, threshold: float = 0.6, index: str = "auto",
               nlist: int = 0, nprobe: int = 16, exact_below: int = 200_000,
               representative: str = "lowest", extra_edges: tuple | None = None,
               **index_kwargs) -> SelfDedupResult:
    """Self-dedup of emb [N, D] (L2-normalised). extra_edges=(i, j) adds edges found elsewhere
    (e.g. identical perceptual hashes) before the components are formed."""
    emb = knn.as_float32(emb, "embeddings")
    if emb.shape[0] == 0:
        return SelfDedupResult(np.zeros(0, np.int64), np.zeros(0, bool), 0, {"n": 0})
    ei, ej = self_edges(emb, k, threshold, index=index, nlist=nlist, nprobe=nprobe,
                        exact_below=exact_below, **index_kwargs)
    if extra_edges is not None:
        ei = np.concatenate([ei, np.asarray(extra_edges[0], np.int64)])
        ej = np.concatenate([ej, np.asarray(extra_edges[1], np.int64)])
    return components_from_edges(emb, ei, ej, representative)


@dataclass
class RelativeDedupResult:
    drop: np.ndarray  # [N_pool] bool, True = in a component that holds an eval near-duplicate
    dropped_components: np.ndarray  # sorted component ids dropped
    matched_pool: np.ndarray  # sorted pool ids directly matched by some eval image
    stats: dict


def eval_matches(index_obj, eval_emb: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, int]:
    """(sorted pool ids within cosine > threshold of some eval image, number of eval images
    with a match) for eval_emb [M, D] searched in a pool index."""
    eval_emb = knn.as_float32(eval_emb, "eval embeddings")
    if eval_emb.shape[0] == 0:
        return np.zeros(0, np.int64), 0
    D, I = knn.search(index_obj, eval_emb, min(k, index_obj.ntotal))
    hit = (D > threshold) & (I >= 0)
    return np.unique(I[hit]), int(hit.any(1).sum())


def drop_matched_components(pool_components: np.ndarray, matched: np.ndarray, n_eval: int,
                            n_eval_with_match: int) -> RelativeDedupResult:
    """Drop every pool component that holds a matched pool image."""
    dropped = np.unique(pool_components[matched])
    drop = np.isin(pool_components, dropped)
    stats = {"n_pool": int(pool_components.shape[0]), "n_eval": int(n_eval),
             "n_eval_with_match": int(n_eval_with_match), "n_matched_pool": int(matched.size),
             "n_dropped_components": int(dropped.size), "n_dropped": int(drop.sum())}
    return RelativeDedupResult(drop, dropped, matched, stats)


def relative_dedup(pool_emb: np.ndarray, pool_components: np.ndarray, eval_emb: np.ndarray,
                   threshold: float = 0.45, k: int = 64, index: str = "auto", nlist: int = 0,
                   nprobe: int = 16, exact_below: int = 200_000, **index_kwargs) -> RelativeDedupResult:
    """Drop every pool component containing a near-duplicate (cosine > threshold) of any
    evaluation image. pool_emb [N, D], pool_components [N], eval_emb [M, D]."""
    pool_emb = knn.as_float32(pool_emb, "pool embeddings")
    pool_components = np.asarray(pool_components, dtype=np.int64)
    if pool_components.shape[0] != pool_emb.shape[0]:
        raise ValueError(f"pool_components has {pool_components.shape[0]} entries for "
                         f"{pool_emb.shape[0]} pool embeddings")
    n = pool_emb.shape[0]
    if n == 0 or len(eval_emb) == 0:
        return RelativeDedupResult(np.zeros(n, bool), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                   {"n_pool": n, "n_eval": len(eval_emb), "n_dropped": 0})
    index_obj = knn.build_index(pool_emb, index=index, nlist=nlist, nprobe=nprobe,
                                exact_below=exact_below, **index_kwargs)
    matched, n_hit = eval_matches(index_obj, eval_emb, threshold, k)
    return drop_matched_components(pool_components, matched, len(eval_emb), n_hit)


# ---- perceptual hash pre-filter -----------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis [n, n]: (C @ v) is the DCT of v."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


_DCT32 = _dct_matrix(32)


def phash(image) -> int:
    """64-bit perceptual hash: grayscale, 32x32, 2-D DCT, top-left 8x8 low frequencies,
    thresholded at their median. `image` is a PIL image or encoded bytes. Returns a uint64 as
    a Python int (identical/near-identical re-encodings of one image share it)."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    g = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ g @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return int(bin(int(a) ^ int(b)).count("1"))


def hash_groups(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i, j) joining items with identical hashes (each to its group's first item)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    j = first[inverse]
    mask = j != np.arange(hashes.shape[0])
    return np.flatnonzero(mask).astype(np.int64), j[mask].astype(np.int64)
