"""`dinoctl pipeline run --backend k8s` against kmock: the stage jobs are PyTorchJobs created
through the real kubernetes client, and the training operator is played by tests/kmock_cluster.py's
LocalOperator (each PyTorchJob runs as local torchrun processes through the LocalExecutor, its
conditions written back). The store is the real S3 server; the stages are tiny real jobs
(tests/workloads/stage_job.py): the variant without podman. The full demo pipeline with its
stage jobs as the chart's pods is tests/k8s/test_pipeline_driver.py (scripts/test-k8s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("kmock", reason="kmock is not installed (pip install -e .[dev])")

from app import cli, storage  # noqa: E402
from app.config import load_config  # noqa: E402
from app.launch.kubernetes import KubernetesExecutor  # noqa: E402
from app.launch.local import LocalExecutor  # noqa: E402
from app.pipeline.runner import Pipeline, pipeline_uri, read_state  # noqa: E402
from tests.kmock_cluster import NS, FakeCluster, LocalOperator  # noqa: E402
from tests.workloads.pipeline_driver import stages  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL = 3


@pytest.fixture
def world(tmp_path, s3_env, monkeypatch):
    """kmock + the operator stand-in + a fresh store on S3; yields (executor, operator, sets)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path / "home"))
    fake = FakeCluster()
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    k8s = KubernetesExecutor(namespace=NS, kubeconfig=kubeconfig, poll_interval=0.05)
    local = LocalExecutor(home=tmp_path / "local-jobs", workdir=REPO, detach=False)
    # what the pods' Secret / ConfigMap references would give them
    pod_env = {**s3_env.env, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
               "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sets = [f"run.store={s3_env.uri('store')}", "run.name=pipe", f"launch.namespace={NS}",
            f"pipeline.lease_ttl_s={LEASE_TTL}", "pipeline.synth_size=24"]
    try:
        with LocalOperator(k8s, local, pod_env) as operator:
            yield k8s, operator, sets
            assert operator.errors == []
    finally:
        fake.close()


def _jobs(k8s) -> dict[str, dict]:
    items = k8s.custom.list_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs")["items"]
    return {o["metadata"]["name"]: o for o in items}


def _driver(tmp_path: Path, name: str, sets: list[str], **env: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.workloads.pipeline_driver", "--namespace", NS]
    for item in sets:
        args += ["--set", item]
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})


def _wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_each_stage_is_a_pytorchjob_reading_its_config_from_the_store(world, capsys):
    k8s, operator, sets = world
    cfg = load_config("demo", ["pipeline.stages=[first,probe]", *sets])
    results = Pipeline(cfg, k8s, registry=stages(), echo=lambda s: None).run()
    assert [(r.name, r.status, r.job) for r in results] == [  # the driver makes the demo's data set
        ("synth", "ran", ""), ("first", "ran", "pipe-first-1"), ("probe", "ran", "pipe-probe-1")], results
    jobs = _jobs(k8s)
    assert sorted(jobs) == ["pipe-first-1", "pipe-probe-1"] == sorted(operator.started)
    probe = jobs["pipe-probe-1"]
    labels = probe["metadata"]["labels"]
    assert labels["dinoctl.dev/pipeline"] == "pipe" and labels["dinoctl.dev/attempt"] == "1"
    command = probe["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    config_uri = command[command.index("--config") + 1]
    assert config_uri == pipeline_uri(cfg, "probe.yaml") and config_uri.startswith("s3://")
    # the stage read its inputs from that config, in the store
    summary = storage.get_json(storage.join(storage.to_uri(cfg.run.store), "runs", "pipe", "probe", "_SUCCESS"))
    assert summary["eval_val"] == load_config(config_uri).eval.val
    # one MLflow parent run, the stages' runs its children
    from mlflow.tracking import MlflowClient

    child = MlflowClient().get_run(summary["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    # `dinoctl pipeline status` over the same API and store
    rc = cli.main(["pipeline", "status", "pipe", "--backend", "k8s", "--namespace", NS, "--config", "demo",
                   *[a for item in sets for a in ("--set", item)], "--set", "pipeline.stages=[curate]"])
    out = capsys.readouterr().out
    assert rc == 0 and "curate" in out and "pending" in out
    state = read_state(cfg)
    assert [(s["name"], s["status"], s["attempt"]) for s in state["stages"]] == [
        ("synth", "ran", 0), ("first", "ran", 1), ("probe", "ran", 1)]
    # a second run is a no-op: no new job
    again = Pipeline(cfg, k8s, registry=stages(), echo=lambda s: None).run()
    assert [r.status for r in again] == ["cached", "cached"] and len(_jobs(k8s)) == 2


def test_a_killed_driver_is_replaced_by_one_that_adopts_its_running_job(world, tmp_path):
    """Driver A runs `probe` (held); driver B is refused by A's lease; A is SIGKILLed; driver C
    takes the lease once it expires and adopts `pipe-probe-1`: one probe job, never two."""
    k8s, operator, sets = world
    hold = tmp_path / "release-probe"
    a = _driver(tmp_path, "a", sets, HOLD_FILE=str(hold))
    _wait_for("probe running", lambda: "pipe-probe-1" in _jobs(k8s) and
              k8s.status("pipe-probe-1").phase == "Running")
    b = _driver(tmp_path, "b", sets, HOLD_FILE=str(hold))
    assert b.wait(timeout=1.5 * LEASE_TTL + 40) == 2
    b_log = (tmp_path / "b.log").read_text()
    assert "another driver is running it" in b_log and "driver:" in b_log, b_log
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(timeout=10)
    c = _driver(tmp_path, "c", sets, HOLD_FILE=str(hold))
    _wait_for("driver C adopting", lambda: "adopting job pipe-probe-1" in (tmp_path / "c.log").read_text(),
              timeout=LEASE_TTL + 40)
    hold.touch()
    assert c.wait(timeout=60) == 0, (tmp_path / "c.log").read_text()
    assert sorted(_jobs(k8s)) == ["pipe-first-1", "pipe-probe-1"]
    assert "taking over the lease" in (tmp_path / "c.log").read_text()


def test_a_failed_stage_stops_the_pipeline_and_a_new_driver_resumes_after_the_fix(world, tmp_path):
    k8s, operator, sets = world
    fix = tmp_path / "the-fix"
    first = _driver(tmp_path, "first", sets, FIX_FILE=str(fix))
    assert first.wait(timeout=90) == 1
    log = (tmp_path / "first.log").read_text()
    assert "job pipe-probe-1 Failed" in log, log
    cfg = load_config("demo", ["pipeline.stages=[first,probe]", *sets])
    state = {s["name"]: s for s in read_state(cfg)["stages"]}
    assert state["first"]["status"] == "ran" and state["probe"]["status"] == "failed"
    fix.touch()  # the cause fixed; the driver started again (as re-creating its Job does)
    second = _driver(tmp_path, "second", sets, FIX_FILE=str(fix))
    assert second.wait(timeout=90) == 0, (tmp_path / "second.log").read_text()
    assert sorted(_jobs(k8s)) == ["pipe-first-1", "pipe-probe-1", "pipe-probe-2"]  # first: skipped
    state = {s["name"]: s for s in read_state(cfg)["stages"]}
    assert state["first"]["status"] == "cached" and (state["probe"]["status"], state["probe"]["attempt"]) == ("ran", 2)


def test_the_k8s_backend_needs_a_store_pods_can_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path / "home"))
    fake = FakeCluster()
    try:
        monkeypatch.setenv("KUBECONFIG", fake.kubeconfig(tmp_path / "kubeconfig"))
        rc = cli.main(["pipeline", "run", "--backend", "k8s", "--config", "demo",
                       "--set", f"run.store=file://{tmp_path}/store"])
    finally:
        fake.close()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "s3://" in err and "run.store" in err
