"""Balanced sampling from a hierarchical clustering (Vo et al. 2024), from the description in
reference/curation.md §2.3 D.

`water_filling` is max-min fair allocation: small clusters are taken whole, large ones are capped
at a common level. Unlike the reference (which hands the leftover units to random clusters) the
leftover units go to the largest clusters first (ties: lower index), so the allocation is
deterministic and needs no RNG.
"""

from __future__ import annotations

import numpy as np

from app.curation.kmeans import ClusterTree

SAMPLINGS = ("random", "closest")


def water_filling(sizes, target: int, multiplier: int = 1) -> np.ndarray:
    """Split `target` units over clusters of `sizes` [C]: each gets min(multiplier*size, level)
    (or level+1 for a few of the largest) so the total is exactly min(target, multiplier*sum).
    Returns allocation [C] int64."""
    a = np.asarray(sizes, dtype=np.int64) * int(multiplier)
    if a.ndim != 1 or (a < 0).any():
        raise ValueError("sizes must be a 1-D array of non-negative counts")
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    if a.sum() <= target:
        return a.copy()
    # Largest integer level c with sum(min(c, a)) <= target, by binary search.
    lo, hi = 0, int(a.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(a, mid).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    alloc = np.minimum(a, lo)
    rest = int(target - alloc.sum())
    if rest:
        capped = np.flatnonzero(a > lo)
        order = capped[np.lexsort((capped, -a[capped]))]  # largest first, then lower index
        alloc[order[:rest]] += 1
    return alloc


def _children(assignment: np.ndarray, n_parents: int) -> list[np.ndarray]:
    """For each parent, the sorted ids of its children."""
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(n_parents + 1))
    return [order[bounds[p]:bounds[p + 1]] for p in range(n_parents)]


def balanced_sample(tree: ClusterTree, n_target: int, sampling: str = "random",
                    multiplier: int = 1, seed: int = 0) -> np.ndarray:
    """Select about n_target data indices, balanced over the tree top-down.

    Water-filling splits the target over the top clusters by their flat sizes, then each
    cluster's share over its children, down to the leaf clusters; a leaf of size s given t
    points yields floor(t/s) full copies plus t mod s members picked at random ("random") or
    closest to the centroid first ("closest"). Returns sorted int64 indices [<= n_target];
    no index appears more than `multiplier` times.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if multiplier < 1:
        raise ValueError(f"multiplier must be >= 1, got {multiplier}")
    rng = np.random.default_rng(seed)
    sizes = tree.flat_sizes()
    top = len(tree.levels) - 1
    alloc = water_filling(sizes[top], n_target, multiplier)
    for lv in range(top, 0, -1):
        child_sizes = sizes[lv - 1]
        child_alloc = np.zeros(child_sizes.shape[0], dtype=np.int64)
        for parent, kids in enumerate(_children(tree.levels[lv].assignment, sizes[lv].shape[0])):
            if alloc[parent] and kids.size:
                child_alloc[kids] = water_filling(child_sizes[kids], int(alloc[parent]), multiplier)
        alloc = child_alloc
    leaf = tree.levels[0]
    picked = []
    for cluster, members in enumerate(_children(leaf.assignment, alloc.shape[0])):
        t = int(alloc[cluster])
        if t == 0 or members.size == 0:
            continue
        full, extra = divmod(t, members.size)
        picked.extend([members] * full)
        if extra:
            if sampling == "random":
                picked.append(rng.choice(members, extra, replace=False))
            else:
                picked.append(members[np.argsort(leaf.distances[members], kind="stable")[:extra]])
    if not picked:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picked)).astype(np.int64)
