"""Fault injection, part 0: the baseline the others stand on. Every in-cluster stage reads its
data from S3 with DataLoader workers and several ranks; the results must be exactly those of the
same data on file://: pretraining (2 ranks x 2 and x 4 workers), distillation, embedding and
evaluation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from app import storage
from tests.faults.training import TrainJob, synth_pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
STEPS = 4


def _copy_tree(src: str, dst: str) -> None:
    for obj in storage.list_objects(src):
        storage.copy(obj.uri, storage.join(dst, obj.uri[len(src):].lstrip("/")))


@pytest.fixture(scope="module")
def both(tmp_path_factory, s3_server):
    """The synthetic data set on file:// and the same bytes on S3; env for S3 while copying."""
    import os

    root = tmp_path_factory.mktemp("equiv")
    local = (root / "store").as_uri()
    pool = synth_pool(local)
    saved = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    try:
        remote = s3_server.uri("store")
        _copy_tree(f"{local}/datasets/synth", f"{remote}/datasets/synth")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return {"root": root, "local": local, "remote": remote, "pool": pool,
            "s3_pool": f"{remote}/datasets/synth/pool"}


@pytest.fixture(scope="module")
def pretrained(both, s3_server):
    """Pretraining: file:// (2 ranks, no workers) against S3 (2 ranks x 2 workers: 4 reading
    processes; more workers only add contention on 2 cores, scripts/bench/data_read.py measures
    0/2/4)."""
    root = both["root"]
    runs = {}
    for name, pool, store, workers, env in (
            ("file-w0", both["pool"], both["local"], 0, {}),
            ("s3-w2", both["s3_pool"], both["remote"], 2, s3_server.env)):
        job = TrainJob(root, name, pool, store, nproc=2, workers=workers, steps=STEPS,
                       checkpoint_every=2, env=env)
        assert job.run_to_end() == 0, job.tail()
        runs[name] = job
    return runs


def test_pretraining_from_s3_with_workers_matches_file(pretrained):
    ref = pretrained["file-w0"]
    for name in ("s3-w2",):
        for rank in (0, 1):
            got, want = pretrained[name].samples(rank), ref.samples(rank)
            assert [r["keys"] for r in got] == [r["keys"] for r in want], name
            assert [r["losses"]["total_loss"] for r in got] == \
                pytest.approx([r["losses"]["total_loss"] for r in want], abs=1e-6), name


def test_distillation_from_s3_with_workers_matches_file(both, pretrained, s3_server, s3_env):
    _copy_tree(f"{both['local']}/runs/file-w0/export", f"{both['remote']}/runs/file-w0/export")
    out = {}
    for name, pool, store, workers, env in (
            ("d-file", both["pool"], both["local"], 0, {}),
            ("d-s3", both["s3_pool"], both["remote"], 2, s3_server.env)):
        job = TrainJob(both["root"], name, pool, store, stage="distill", workers=workers,
                       steps=STEPS, checkpoint_every=100, env=env,
                       sets={"distill.teacher": f"{store}/runs/file-w0", "student.img_size": 42,
                             "student.embed_dim": 64, "student.depth": 2,
                             "distill.max_steps": STEPS, "distill.student_ema_momentum": 0.5})
        assert job.run_to_end() == 0, job.tail()
        out[name] = job.samples(0)
    assert [r["keys"] for r in out["d-s3"]] == [r["keys"] for r in out["d-file"]]
    assert [r["losses"]["total_loss"] for r in out["d-s3"]] == \
        pytest.approx([r["losses"]["total_loss"] for r in out["d-file"]], abs=1e-6)


def _curation_cfg(store: str, pool: str, teacher: str, workers: int):
    from app.config import load_config

    return load_config("demo", [
        f"run.name=emb", f"run.store={store}", f"curation.pool={pool}", "curation.seeds=[]",
        "curation.eval_sets=[]", "curation.embed.model=vit", "curation.embed.arch=vit_tiny",
        f"curation.embed.weights={teacher}", "curation.embed.image_size=42",
        "curation.embed.batch_size=8", f"curation.embed.num_workers={workers}",
        "curation.dedup.descriptor=embedding", "model.img_size=42"])


def test_embedding_from_s3_matches_file(both, pretrained, s3_env, dinoctl_home):
    from app.curation.artifacts import CurationRun
    from app.curation.embed import load_set
    from app.curation.run import curate

    teacher = f"{both['local']}/runs/file-w0"
    vectors = {}
    for name, store, pool in (("file", both["local"], both["pool"]),
                              ("s3", both["remote"], both["s3_pool"])):
        cfg = _curation_cfg(store, pool, teacher, workers=2)
        curate("embed", cfg)
        data = load_set(CurationRun(store, "emb"), "pool", pool)
        vectors[name] = (list(data["keys"]), np.asarray(data["embeddings"]))
    assert vectors["s3"][0] == vectors["file"][0] and len(vectors["file"][0]) == 48
    np.testing.assert_array_equal(vectors["s3"][1], vectors["file"][1])


def test_evaluation_from_s3_matches_file(both, pretrained, s3_env, dinoctl_home, tmp_path):
    from app.eval.run import main

    summaries = {}
    for name, store in (("file", both["local"]), ("s3", both["remote"])):
        config = tmp_path / f"eval-{name}.yaml"
        config.write_text(f"""
run: {{name: ev-{name}, store: "{store}", experiment: eval-equiv}}
eval:
  model: "{both['local']}/runs/file-w0"
  train: "{store}/datasets/synth/eval_train"
  val: "{store}/datasets/synth/eval_val"
  image_size: 42
  batch_size: 8
  num_workers: 2
  cache: false
  linear_epochs: 5
  linear_lrs: [0.01]
  linear_wds: [0.0]
""")
        assert main(["eval", "--config", str(config)]) == 0
        summaries[name] = storage.get_json(f"{store}/runs/ev-{name}/eval/summary.json")
    assert summaries["s3"]["knn"]["top1"] == summaries["file"]["knn"]["top1"]
    assert summaries["s3"]["linear"]["top1"] == summaries["file"]["linear"]["top1"]
    assert summaries["s3"]["counts"] == summaries["file"]["counts"]
