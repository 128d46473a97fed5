"""Fault injection, part 2: the servers a job depends on. A real S3 server (SeaweedFS, its own
instance here so killing it disturbs no other test) and a real MLflow server, killed and
restarted under running training jobs that read their data and write their checkpoints on S3.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from app import storage
from app.train.checkpoint import MANIFEST_FILE, check_complete, checkpoints_uri, read_latest
from tests.faults.proxy import FaultProxy
from tests.faults.training import TrainJob, assert_same_trajectory, synth_pool
from tests.services import MlflowServer, seaweedfs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 6


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("faults-s3"), bucket="faults") as server:
        yield server


@pytest.fixture
def s3_env_of(monkeypatch, s3):
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3):
    """The same pool on file:// and on S3, and the undisturbed run on file:// (2 workers)."""
    root = tmp_path_factory.mktemp("faults-services")
    local_store = (root / "store").as_uri()
    local_pool = synth_pool(local_store)
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        s3_pool = s3.uri("pool")
        for obj in storage.list_objects(local_pool):
            storage.copy(obj.uri, storage.join(s3_pool, obj.uri[len(local_pool):].lstrip("/")))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    ref = TrainJob(root, "reference", local_pool, local_store, workers=2, steps=STEPS)
    assert ref.run_to_end() == 0, ref.tail()
    return {"root": root, "s3_pool": s3_pool, "reference": ref.losses(0)}


def _no_partial_checkpoints(store: str, run: str) -> None:
    """LATEST names a whole checkpoint, and every checkpoint directory left is whole too."""
    tag = read_latest(store, run)
    assert tag is not None
    root = checkpoints_uri(store, run)
    check_complete(f"{root}/{tag}")
    dirs = {o.uri[len(root) + 1:].split("/", 1)[0] for o in storage.list_objects(root + "/")
            if "/" in o.uri[len(root) + 1:]}
    for d in dirs:
        assert storage.exists(f"{root}/{d}/{MANIFEST_FILE}"), f"{d} has no manifest"
        check_complete(f"{root}/{d}")


def _restart_later(server, delay: float) -> threading.Thread:
    def restart() -> None:
        time.sleep(delay)
        try:
            server.start()
        except RuntimeError:
            # killed again while it was starting: the test's next outage began, and the restart
            # that follows that one brings the server back (the job's exit code shows it did)
            pass

    t = threading.Thread(target=restart, daemon=True)
    t.start()
    return t


def test_s3_killed_during_reads_and_during_a_checkpoint_upload_the_job_finishes_on_the_same_trajectory(
        data, s3, s3_env_of):
    """Two S3 crashes in one job (SIGKILL, as a crashed node: no goodbye on open sockets): first
    while the DataLoader workers stream shards (step 1), then while the first checkpoint's files
    are on their way (held at a proxy). Each time the server comes back seconds later; the job
    retries, finishes on the undisturbed trajectory, and leaves no partial checkpoint."""
    port = int(s3.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        store = s3.uri("store")
        env = {**s3.env, "S3_ENDPOINT_URL": proxy.endpoint}
        job = TrainJob(data["root"], "s3-kill", data["s3_pool"], store, workers=2,
                       steps=STEPS, checkpoint_every=4, env=env)
        restarted: list[threading.Thread] = []

        def kill_server() -> None:  # the first checkpoint file is on its way
            s3.stop(kill=True)
            restarted.append(_restart_later(s3, 8.0))

        proxy.on_request(rb"^PUT .*/checkpoints/step-00000004/", kill_server, hold_s=0.5)
        job.start()
        job.wait_step(1)
        s3.stop(kill=True)  # during reads
        _restart_later(s3, 6.0).join()
        rc = job.wait(timeout=300)
        for t in restarted:
            t.join()
    assert restarted, "the checkpoint upload was never seen"
    assert rc == 0, job.tail()
    assert "retry" in job.tail(200_000)  # it did see the outages
    assert_same_trajectory(job.losses(0), data["reference"], STEPS)
    _no_partial_checkpoints(store, "s3-kill")


def test_s3_gone_for_good_the_job_fails_within_its_retry_budget_naming_the_endpoint(
        data, s3, s3_env_of):
    store = s3.uri("store")
    job = TrainJob(data["root"], "s3-gone", data["s3_pool"], store, workers=2, steps=200,
                   checkpoint_every=1000, env={**s3.env, "S3_RETRY_DEADLINE_SECONDS": "10"})
    job.start()
    job.wait_step(1)
    s3.stop(kill=True)
    try:
        started = time.monotonic()
        rc = job.wait(timeout=120)
        took = time.monotonic() - started
    finally:
        s3.start()
    assert rc == 1, job.tail()
    assert took < 10 + 45, f"took {took:.0f} s"
    errors = [line for line in job.tail().splitlines() if "pretrain: error:" in line]
    assert errors and s3.endpoint in errors[-1], job.tail()


@pytest.fixture
def mlflow(tmp_path, s3):
    server = MlflowServer(tmp_path / "mlflow", s3)
    from tests.services import free_ports

    (server.port,) = free_ports(1)
    yield server
    server.stop(kill=True)


def _run_of(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == f"{name}-pretrain"]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "total_loss"))
    return runs[0], steps


def test_mlflow_down_at_start_training_finishes_and_the_run_appears_when_it_is_up(data, mlflow):
    root = data["root"]
    store = (root / "store").as_uri()
    job = TrainJob(root, "mlflow-late", store + "/datasets/synth/pool", store, steps=12,
                   checkpoint_every=100, env={"MLFLOW_TRACKING_URI": mlflow.uri})
    started = time.monotonic()
    job.start()
    job.wait_step(1)
    mlflow.start()
    assert job.wait(timeout=300) == 0, job.tail()
    assert time.monotonic() - started < 200
    log = job.tail(200_000)
    assert log.count("is unreachable (") == 1, log[-3000:]
    run, steps = _run_of(mlflow.uri, "mlflow-late")
    assert run.info.status == "FINISHED"
    assert [s for s in steps if s > 0] == list(range(1, 13))  # every step, the outage's included
    assert run.data.params["train.max_steps"] == "12"


def test_mlflow_killed_mid_run_training_finishes_and_the_run_is_complete(data, mlflow):
    root = data["root"]
    store = (root / "store").as_uri()
    job = TrainJob(root, "mlflow-kill", store + "/datasets/synth/pool", store, steps=12,
                   checkpoint_every=100, env={"MLFLOW_TRACKING_URI": mlflow.uri})
    mlflow.start()
    job.start()
    job.wait_step(2)
    mlflow.stop(kill=True)
    job.wait_step(5)
    mlflow.start()
    assert job.wait(timeout=300) == 0, job.tail()
    run, steps = _run_of(mlflow.uri, "mlflow-kill")
    assert run.info.status == "FINISHED"
    assert [s for s in steps if s > 0] == list(range(1, 13))
