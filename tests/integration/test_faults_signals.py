"""Fault injection, part 1: signals. Real training jobs started with the pods' own command
(`torchrun -m app.entry pretrain ...`), disturbed from outside the way Kubernetes and the kernel
disturb them: SIGTERM to the launcher (pod deletion, node drain), SIGKILL to a DataLoader worker
(the OOM killer), SIGKILL to one rank. Every job here must end on its own, promptly, with the
exit code a PyTorchJob's restartPolicy needs, and resume on the same trajectory.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from app.launch.jobspec import JobSpec
from app.launch.local import LocalExecutor
from app.train.checkpoint import check_complete, checkpoints_uri, read_latest
from tests.faults.proxy import FaultProxy
from tests.faults.training import (REPO, TINY, TrainJob, assert_same_trajectory, descendants,
                                   free_port, synth_pool)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-signals")
    store = (root / "store").as_uri()
    return root, store, synth_pool(store)


@pytest.fixture(scope="module")
def reference(data):
    """The undisturbed 2-rank run every disturbed one must reproduce."""
    root, store, pool = data
    job = TrainJob(root, "reference", pool, store, nproc=2, steps=STEPS)
    assert job.run_to_end() == 0, job.tail()
    return {r: job.losses(r) for r in (0, 1)}


def _checkpoint_ok(store: str, run: str) -> str:
    tag = read_latest(store, run)
    assert tag is not None
    check_complete(f"{checkpoints_uri(store, run)}/{tag}")  # every file present, right sizes
    return tag


def test_sigterm_during_a_step_exits_143_through_torchrun_and_resumes_exactly(data, reference):
    root, store, pool = data
    job = TrainJob(root, "term-step", pool, store, nproc=2, steps=STEPS, checkpoint_every=100)
    job.start()
    job.wait_step(2)
    started = time.monotonic()
    os.kill(job.pid, signal.SIGTERM)  # the launcher, as the kubelet signals a pod's PID 1
    rc = job.wait(timeout=120)
    assert rc == 143, job.tail()
    assert time.monotonic() - started < 60
    tag = _checkpoint_ok(store, "term-step")
    assert 3 <= int(tag.split("-")[1]) < STEPS  # the step in flight finished, then saved
    assert job.run_to_end("--resume", "auto") == 0, job.tail()
    for rank in (0, 1):
        assert_same_trajectory(job.losses(rank), reference[rank], STEPS)


def test_sigterm_while_a_checkpoint_is_written_keeps_that_checkpoint(data, reference, s3_server,
                                                                    monkeypatch):
    """The checkpoint upload is held at the proxy while SIGTERM arrives: the job finishes writing
    it, exits 143 without a second one, and resumes from it."""
    root, _, pool = data
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        store = s3_server.uri("term-ckpt")
        job = TrainJob(root, "term-ckpt", pool, store, nproc=2, steps=STEPS, checkpoint_every=2,
                       env={**s3_server.env, "S3_ENDPOINT_URL": proxy.endpoint})
        proxy.on_request(rb"^PUT .*/checkpoints/step-00000002/", lambda: os.kill(job.pid, signal.SIGTERM),
                         hold_s=2.0)
        job.start()
        rc = job.wait(timeout=180)
        assert rc == 143, job.tail()
        for name, value in s3_server.env.items():
            monkeypatch.setenv(name, value)
        assert _checkpoint_ok(store, "term-ckpt") == "step-00000002"
        assert job.run_to_end("--resume", "auto") == 0, job.tail()
    for rank in (0, 1):
        assert_same_trajectory(job.losses(rank), reference[rank], STEPS)


def test_a_sigkilled_dataloader_worker_fails_the_job_fast_and_says_so(data):
    root, store, pool = data
    job = TrainJob(root, "oom-worker", pool, store, nproc=1, workers=2, steps=200,
                   checkpoint_every=1000)
    job.start()
    job.wait_step(1)
    trainer = job.worker_pids()[0]
    workers = [p for p in descendants(trainer)]
    assert workers, "no DataLoader worker processes found"
    started = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
    rc = job.wait(timeout=90)
    assert rc == 1, job.tail()
    assert time.monotonic() - started < 60
    last = [line for line in job.tail().splitlines() if "pretrain: error:" in line]
    assert last and "DataLoader worker" in last[-1], job.tail()
    assert "killed by signal" in last[-1] or "exited unexpectedly" in last[-1], last[-1]


def test_a_failing_storage_read_in_a_worker_ends_the_job_with_one_line(data, tmp_path):
    """A worker's error reaches the trainer, which stops its workers and exits: no hang in
    multiprocessing's exit handler, the worker's own message as the last line."""
    root, store, pool = data
    from app import storage

    broken = tmp_path / "broken"
    for obj in storage.list_objects(pool):  # a copy of the pool whose shards then disappear
        rel = obj.uri[len(storage.to_uri(pool)):].lstrip("/")
        storage.copy(obj.uri, storage.join(broken.as_uri(), rel))
    for shard in (broken / "shards").glob("*.tar"):
        shard.unlink()
    job = TrainJob(root, "gone-shards", broken.as_uri(), store, nproc=1, workers=2, steps=4)
    started = time.monotonic()
    rc = job.run_to_end(timeout=120)
    assert rc == 1, job.tail()
    assert time.monotonic() - started < 60
    errors = [line for line in job.tail().splitlines() if "pretrain: error:" in line]
    assert errors and "/shards/shard-0000" in errors[-1] and "in a DataLoader worker" in errors[-1], \
        job.tail()


def test_one_rank_sigkilled_the_other_rank_exits_on_its_own(data, tmp_path):
    """Two launchers (node ranks 0 and 1, as two pods): SIGKILL node 1's training process. In a
    cluster nobody stops node 0 for us: its rank must leave the collective and exit non-zero by
    itself, inside `train.collective_timeout_s`, so its pod restarts too."""
    root, store, pool = data
    port = str(free_port())
    jobs = []
    for node in (0, 1):
        jobs.append(TrainJob(root, "rank-alone", pool, store, steps=200, checkpoint_every=1000,
                             sets={"train.collective_timeout_s": 30},
                             env={"DINOCTL_LOG_SUFFIX": f"-node{node}"},
                             launcher=("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
                                       "1", "--master-addr", "127.0.0.1", "--master-port", port)))
    for job in jobs:
        job.start()
    try:
        jobs[0].wait_step(1)
        os.kill(jobs[1].worker_pids()[0], signal.SIGKILL)
        started = time.monotonic()
        rc = jobs[0].wait(timeout=90)
        assert time.monotonic() - started < 45, "node 0 waited past the collective timeout"
        assert rc != 0
    finally:
        for job in jobs:
            job.kill()


def test_one_rank_sigkilled_the_group_restarts_and_resumes_on_the_same_trajectory(data, reference,
                                                                                 tmp_path):
    """2 replicas (Master + Worker, one rank each) under the LocalExecutor: SIGKILL the Worker's
    training process after the first checkpoint; the group restarts (OnFailure, the whole group:
    app/launch/local.py) and resumes from LATEST on the trajectory of the undisturbed run."""
    root, store, pool = data
    run = "rank-kill"
    args = ["--config", "demo"]
    sets = {**TINY, "run.name": run, "run.store": store, "train.dataset": pool,
            "train.num_workers": 0, "train.max_steps": STEPS, "train.checkpoint_every": 2,
            "train.collective_timeout_s": 30}
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    samples = tmp_path / "samples"
    spec = JobSpec(name=run, stage="pretrain", args=tuple(args), replicas=2,
                   restart_policy="OnFailure", backoff_limit=2,
                   env=(("DINOCTL_STAGING", str(tmp_path / "staging")),
                        ("DINOCTL_SAMPLE_LOG", str(samples)), ("OMP_NUM_THREADS", "1")))
    ex = LocalExecutor(home=tmp_path / "home", workdir=REPO)
    name = ex.submit(spec)
    try:
        deadline = time.monotonic() + 240
        while read_latest(store, run) is None:
            assert time.monotonic() < deadline and not ex.status(name).done, ex.status(name)
            time.sleep(0.05)
        worker = ex.store.record(name)["replicas"]["worker-0"]["pid"]
        trainers = [p for p in descendants(worker)]
        assert trainers
        os.kill(trainers[0], signal.SIGKILL)
        status = ex.wait(name, timeout=300)
    finally:
        if not ex.status(name).done:
            ex.cancel(name)
    assert status.phase == "Succeeded", status.reason
    assert status.restarts == 1
    summary = json.loads((root / "store" / "runs" / run / "export" / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"]) == (STEPS, 2)
    log = (tmp_path / "home" / "jobs" / name / "master-0.log").read_text()
    assert "resumed from" in log.split("attempt 2")[1]  # the restarted group continued from LATEST

    for rank in (0, 1):
        rows = [json.loads(line) for line in
                (tmp_path / f"samples.rank{rank}.jsonl").read_text().splitlines()]
        losses = {row["step"]: row["losses"]["total_loss"] for row in rows}
        assert_same_trajectory(losses, reference[rank], STEPS)
