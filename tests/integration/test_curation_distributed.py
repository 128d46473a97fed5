"""`torchrun -m app.entry curate` on two ranks: embed splits shards over ranks, dedup splits the
k-NN queries over ranks against one shared cell partition, cluster runs its first k-means level
data-parallel, and the rank-0 stages run while the other rank waits at the barrier."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from app.curation import dedup
from app.curation.artifacts import CurationRun
from app.curation.embed import load_set


def _curate_on_two_ranks(tmp_path, sets):
    """`torchrun --nproc_per_node 2 -m app.entry curate run --config curate_lvd --set ...`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "DINOCTL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", port, "-m", "app.entry", "curate", "run", "--config", "curate_lvd"]
    cmd += [x for kv in sets for x in ("--set", kv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_rank_embed_dedup_and_cluster(tmp_path):
    from app.data.synth import synthesize

    synth = tmp_path / "synth"
    synthesize(synth.as_uri(), seed=1, n_pool=60, n_seeds=8, n_eval_train=8, n_eval_val=4,
               image_size=32, n_corrupt=0, max_samples_per_shard=10)
    store = (tmp_path / "store").as_uri()
    sets = [f"run.store={store}", "run.name=d", f"curation.pool={synth.as_uri()}/pool",
            "curation.embed.model=thumbnail", "curation.stages=[embed,dedup,cluster]",
            f"curation.eval_sets=[{synth.as_uri()}/eval_val]",
            # cells probing every cell: exact, so the result must equal one exact search
            "curation.dedup.index=cells", "curation.dedup.nlist=4", "curation.dedup.nprobe=4",
            "curation.dedup.threshold=0.9", "curation.dedup.eval_threshold=0.9",
            "curation.cluster.n_clusters=[6,2]", "curation.cluster.n_resampling_steps=[2,1]",
            "curation.cluster.sample_size=[3,1]", "curation.cluster.n_iters=5",
            "curation.cluster.target_size=30"]
    _curate_on_two_ranks(tmp_path, sets)
    run = CurationRun(store, "d")
    emb = run.summary("embeddings")
    assert emb["world_size"] == 2
    assert emb["sets"]["pool"]["images"] == 60 and emb["sets"]["pool"]["shards"] == 6
    summary = run.summary("dedup")
    assert summary["n_pool"] == 60 and summary["world_size"] == 2 and summary["index"] == "cells"
    # both ranks wrote their share of the searches
    assert [run.get_arrays(f"dedup/parts/rank{r:05d}-of-00002.npz")["ei"].ndim for r in (0, 1)] == [1, 1]
    pool = load_set(run, "pool", f"{synth.as_uri()}/pool")
    evals = load_set(run, "eval0-eval_val", f"{synth.as_uri()}/eval_val")["embeddings"]
    want = dedup.self_dedup(pool["embeddings"], k=64, threshold=0.9, index="flat")
    want_rel = dedup.relative_dedup(pool["embeddings"], want.components, evals, threshold=0.9,
                                    index="flat")
    got = run.get_arrays("dedup/dedup.npz")
    assert np.array_equal(got["components"], want.components)
    assert np.array_equal(got["eval_drop"], want_rel.drop)
    assert summary["self"]["n_removed"] > 0  # the planted duplicates are there to be found
    clusters = run.summary("clusters")
    assert clusters["world_size"] == 2 and clusters["n_input"] == summary["n_kept"]
    assert clusters["n_selected"] == min(30, summary["n_kept"])
    level0 = run.get_arrays("clusters/level0.npz")
    assert level0["assignment"].shape == (summary["n_kept"],) and level0["centroids"].shape[0] == 6
    # a rerun on two ranks skips every stage on both (no rank left waiting at a barrier)
    assert "already done" in _curate_on_two_ranks(tmp_path, sets).stderr


@pytest.mark.slow
def test_two_rank_embed_shares_one_copy_head(tmp_path):
    """Rank 0 fits the copy head once; both ranks embed their shards with that same head, so
    every stored copy descriptor is what the saved head gives for that image."""
    from app.config import load_config
    from app.curation.copy_head import CopyHead
    from app.curation.embed import build_embedder
    from app.data import Dataset, decode_image, iter_shard
    from app.data.synth import synthesize

    synth = tmp_path / "synth"
    synthesize(synth.as_uri(), seed=3, n_pool=40, n_seeds=4, n_eval_train=4, n_eval_val=4,
               image_size=32, n_corrupt=0, max_samples_per_shard=10)
    store = (tmp_path / "store").as_uri()
    sets = [f"run.store={store}", "run.name=h", f"curation.pool={synth.as_uri()}/pool",
            "curation.stages=[embed,dedup]", "curation.embed.model=vit", "curation.embed.arch=vit_tiny",
            "curation.embed.weights=", "curation.embed.image_size=28",
            "curation.dedup.copy_head.train_images=20", "curation.dedup.copy_head.views=3",
            "curation.dedup.copy_head.steps=20", "curation.dedup.copy_head.batch_size=16"]
    _curate_on_two_ranks(tmp_path, sets)
    run = CurationRun(store, "h")
    assert run.summary("embeddings")["world_size"] == 2
    assert run.summary("dedup")["descriptor"] == "copy"
    head = CopyHead.from_arrays(run.get_arrays("embeddings/copy_head.npz"))
    embedder = build_embedder(load_config("curate_lvd", sets), head)
    pool = load_set(run, "pool", f"{synth.as_uri()}/pool")
    row = {k: i for i, k in enumerate(pool["keys"].tolist())}
    shards = Dataset(f"{synth.as_uri()}/pool").shard_uris
    for shard in (shards[0], shards[-1]):  # round-robin: the first and last shard, different ranks
        samples = list(iter_shard(shard))[:3]
        got = embedder([decode_image(s.image_bytes, s.key) for s in samples])["copy"]
        stored = pool["copy"][[row[s.key] for s in samples]]
        np.testing.assert_allclose(stored, got, atol=2e-3)  # stored as float16
