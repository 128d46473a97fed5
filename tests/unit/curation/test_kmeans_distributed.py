"""Data-parallel k-means over two real gloo ranks against the same algorithm on one process."""

import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from app.curation.comm import Comm
from app.curation.kmeans import (hierarchical_kmeans_distributed, kmeans_distributed,
                                 resampled_kmeans_distributed)


def _data(n=600, d=8, modes=12, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((modes, d)).astype(np.float32) * 4
    w = 1.0 / np.arange(1, modes + 1)
    return (c[rng.choice(modes, n, p=w / w.sum())] + rng.standard_normal((n, d))).astype(np.float32)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# init_per_centroid large: the init sample is every row, in global order, for any world size,
# so one process and two ranks start from the same centroids and must stay together.
KW = dict(n_iters=8, init="kmeans++", seed=3, init_per_centroid=10_000)


def _run(comm, x):
    rows = comm.rows(len(x))
    km = kmeans_distributed(x[rows], 10, comm, **KW)
    rs = resampled_kmeans_distributed(x[rows], 10, comm, n_resampling_steps=2, sample_size=5,
                                      n_iters=5, seed=3)
    tree = hierarchical_kmeans_distributed(x[rows], comm, [10, 3], [2, 1], [5, 2], n_iters=5, seed=3)
    return {"labels": km.labels, "centroids": km.centroids, "objective": km.objective,
            "rs_labels": rs.labels,
            "tree": None if tree is None else [lv.assignment for lv in tree.levels]}


def _worker(rank, world, port, x, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        np.save(f"{out}.{rank}.npy", np.array(_run(Comm(rank, world), x), dtype=object))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_kmeans_matches_one_process(tmp_path):
    x = _data()
    single = _run(Comm(), x)
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(2, _free_port(), x, out), nprocs=2, join=True)
    ranks = [np.load(f"{out}.{r}.npy", allow_pickle=True).item() for r in range(2)]
    # every rank labels its own rows; together they are the single-process labelling
    assert np.array_equal(np.concatenate([r["labels"] for r in ranks]), single["labels"])
    for r in ranks:  # all-reduced centroids are identical on both ranks
        np.testing.assert_allclose(r["centroids"], single["centroids"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["objective"], single["objective"], rtol=1e-5)
    assert single["objective"][-1] <= single["objective"][0]
    assert np.array_equal(np.concatenate([r["rs_labels"] for r in ranks]), single["rs_labels"])
    # the tree comes back on rank 0 only, with level 0 covering all rows
    assert ranks[1]["tree"] is None
    for got, want in zip(ranks[0]["tree"], single["tree"]):
        assert np.array_equal(got, want)
    assert len(ranks[0]["tree"][0]) == len(x)


def test_comm_rows_split_contiguously_and_cover_everything():
    parts = [Comm(r, 3).rows(10) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(ValueError, match="rank must be"):
        Comm(3, 3)
