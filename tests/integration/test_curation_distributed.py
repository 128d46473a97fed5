"""`torchrun -m app.entry curate` on two ranks: embed splits shards over ranks and the rank-0
stages run while the other rank waits at the barrier."""

import os
import socket
import subprocess
import sys

import pytest

from app.curation.artifacts import CurationRun


@pytest.mark.slow
def test_two_rank_embed_and_dedup_cover_every_shard_once(tmp_path):
    from app.data.synth import synthesize

    synth = tmp_path / "synth"
    synthesize(synth.as_uri(), seed=1, n_pool=60, n_seeds=8, n_eval_train=8, n_eval_val=4,
               image_size=32, n_corrupt=0, max_samples_per_shard=10)
    store = (tmp_path / "store").as_uri()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "DINOCTL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    sets = [f"run.store={store}", "run.name=d", f"curation.pool={synth.as_uri()}/pool",
            "curation.embed.model=thumbnail", "curation.stages=[embed,dedup]"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", port, "-m", "app.entry", "curate", "run", "--config", "curate_lvd"]
    cmd += [x for kv in sets for x in ("--set", kv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = CurationRun(store, "d")
    emb = run.summary("embeddings")
    assert emb["world_size"] == 2
    assert emb["sets"]["pool"]["images"] == 60 and emb["sets"]["pool"]["shards"] == 6
    assert run.summary("dedup")["n_pool"] == 60
    # a rerun on two ranks skips every stage on both (no rank left waiting at a barrier)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done" in again.stderr
