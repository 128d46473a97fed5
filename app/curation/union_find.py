"""Connected components of a graph given as an edge list (a scalable disjoint-set / union-find).

DINOv2 (App. A.3) groups near-duplicates as the connected components of the thresholded k-NN
graph. Edge lists there have ~N*64 entries, so the union-find is vectorised: every round hooks
each root onto the smallest root it shares an edge with, then compresses paths by pointer
jumping. Hooking only ever points a root at a smaller root, so no cycles form and every
component ends up labelled by its smallest member index (deterministic, order independent).
"""

from __future__ import annotations

import numpy as np


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points straight at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, edges_i: np.ndarray, edges_j: np.ndarray) -> np.ndarray:
    """Label the connected components of an undirected graph on nodes 0..n-1.

    edges_i, edges_j: [E] integer node ids (self-loops and repeated edges are fine).
    Returns labels [n] int64 where labels[v] is the smallest node id in v's component.
    """
    edges_i = np.asarray(edges_i, dtype=np.int64).ravel()
    edges_j = np.asarray(edges_j, dtype=np.int64).ravel()
    if edges_i.shape != edges_j.shape:
        raise ValueError(f"edges_i and edges_j differ in length: {edges_i.size} vs {edges_j.size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if edges_i.size and (min(edges_i.min(), edges_j.min()) < 0 or max(edges_i.max(), edges_j.max()) >= n):
        raise ValueError(f"edge endpoint outside 0..{n - 1}")
    parent = np.arange(n, dtype=np.int64)
    keep = edges_i != edges_j
    a, b = edges_i[keep], edges_j[keep]
    while a.size:
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        cross = lo != hi
        if not cross.any():
            break
        # Edges inside one component are done for good: drop them so later rounds shrink.
        a, b, lo, hi = a[cross], b[cross], lo[cross], hi[cross]
        np.minimum.at(parent, hi, lo)
        parent = _compress(parent)
    return _compress(parent)


def relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary component labels to 0..C-1 (in order of first label value).

    Returns (dense [n] int64, sizes [C] int64).
    """
    uniq, dense, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    return dense.astype(np.int64), sizes.astype(np.int64)
