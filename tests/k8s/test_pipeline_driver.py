"""The demo pipeline through `dinoctl pipeline run --backend k8s`, its stage jobs run as pods.

The driver is the real CLI on the host, talking to kmock (tests/kmock_cluster.py) as its API
server; the training operator is played by `PodmanOperator`: every PyTorchJob the driver creates
in kmock runs as the pods the real operator would make (app/launch/operator.py), as containers of
the CPU image in the podman harness with the chart's platform (tests/k8s/stack.py), and its
conditions are written back to the job. Stage configs and outputs pass through the chart's S3 pod.

The first pretraining attempt is SIGKILLed after its first checkpoint (as a node loss would), so
the first driver stops with that job's failure; the driver started again skips curation, runs
pretraining as attempt 2 from LATEST, and goes on to register.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.k8s.cluster import PodmanCluster
from tests.k8s.render import ROOT
from tests.k8s.stack import NS, STAGE_TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.k8s]
kmock_cluster = pytest.importorskip("tests.kmock_cluster")
RUN = "k8spipe"
DEMO_CI = ["train.batch_size_per_gpu=8", "train.num_workers=2", "train.max_steps=12", "train.checkpoint_every=4",
           "train.collective_timeout_s=60", "train.lease_ttl_s=20", "distill.max_steps=8",
           "eval.linear_epochs=10", "curation.cluster.target_size=160", "curation.name=k8spipe-curated",
           "pipeline.lease_ttl_s=10"]  # values-ci.yaml's sizes for the demo preset


class PodmanOperator(kmock_cluster.OperatorStandIn):
    """Plays the training operator for the PyTorchJobs in kmock's namespace: each new job runs
    as containers (PodmanCluster.run_pytorchjob) in a thread of its own; Created/Running, then
    Succeeded or Failed (naming the pods' exit codes) are written to its status. `on_started`
    may act on a job's pods once they run (e.g. kill one)."""

    def __init__(self, k8s, cluster: PodmanCluster, on_started=None):
        super().__init__(k8s, poll_s=0.5)
        self.cluster = cluster
        self.on_started = on_started or (lambda name, cl, pods: None)

    def _run(self, obj: dict) -> None:
        name = obj["metadata"]["name"]
        job = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "spec": obj["spec"],
               "metadata": {k: obj["metadata"][k] for k in ("name", "namespace", "labels") if k in obj["metadata"]}}
        running = [{"type": "Created", "message": "job created"}, {"type": "Running", "message": "job running"}]
        try:
            self.write_conditions(name, running)
            results = self.cluster.run_pytorchjob(job, timeout=STAGE_TIMEOUT,
                                                  on_started=lambda cl, pods: self.on_started(name, cl, pods))
            bad = {p: c for p, c in results.items() if c != 0}
            end = ({"type": "Failed", "message": "pods exited with " + ", ".join(f"{p}: {c}" for p, c in bad.items())}
                   if bad else {"type": "Succeeded", "message": "job succeeded"})
            self.write_conditions(name, [*running, end])
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def reconcile(self) -> None:
        for obj in self.jobs():
            if obj["metadata"]["name"] not in self.started:
                self.started.append(obj["metadata"]["name"])
                threading.Thread(target=self._run, args=(obj,), daemon=True).start()


def _driver(stack, kubeconfig: str, home, log) -> int:
    args = [sys.executable, "-m", "app.cli", "pipeline", "run", "--backend", "k8s", "--namespace", NS,
            "--config", "demo", "--set", f"run.name={RUN}", "--set", "run.store=s3://dinoctl/store",
            "--set", f"launch.image={stack.image}", "--set", "launch.cpu=1", "--set", "launch.memory=3Gi",
            "--set", "launch.restart_policy=Never", "--set", "launch.backoff_limit=0"]  # a kill fails the job
    for item in DEMO_CI:
        args += ["--set", item]
    env = {**os.environ, **stack.s3_env(), "KUBECONFIG": kubeconfig, "DINOCTL_HOME": str(home),
           "DINOCTL_TRACKING": "off",  # the driver's MLflow parent run: tests/integration/test_pipeline_k8s.py
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.run(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=6 * STAGE_TIMEOUT).returncode


def test_the_demo_pipeline_runs_through_the_api_and_a_new_driver_resumes_after_a_failure(stack, tmp_path):
    from app.launch.kubernetes import KubernetesExecutor

    if not stack.s3().bucket_exists("dinoctl"):  # made by the chart's hook in test_chart_pods
        stack.s3().make_bucket("dinoctl")
    fake = kmock_cluster.FakeCluster()
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    k8s = KubernetesExecutor(namespace=NS, kubeconfig=kubeconfig)
    store = "store/runs/" + RUN

    def kill_first_pretrain(name: str, cl: PodmanCluster, pods: list[str]) -> None:
        if name != f"{RUN}-pretrain-1":
            return
        deadline = time.monotonic() + STAGE_TIMEOUT
        while not stack.s3_exists(f"{store}/checkpoints/LATEST"):
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(1)
        cl.kill(pods[0], "SIGKILL")  # the Master, as a node failure would

    try:
        with PodmanOperator(k8s, stack.cluster, on_started=kill_first_pretrain) as op:
            rc = _driver(stack, kubeconfig, tmp_path / "home1", tmp_path / "driver1.log")
            log1 = (tmp_path / "driver1.log").read_text()
            assert rc == 1, log1[-4000:]
            assert f"job {RUN}-pretrain-1 Failed: pods exited with {RUN}-pretrain-1-master-0: 137" in log1, log1[-4000:]
            assert "curate" in log1 and "ran" in log1
            rc = _driver(stack, kubeconfig, tmp_path / "home2", tmp_path / "driver2.log")
            log2 = (tmp_path / "driver2.log").read_text()
            assert rc == 0, log2[-4000:] + "\n".join(op.errors)
            assert op.errors == []
        # each stage one PyTorchJob (pretraining twice: the killed attempt and the one after the fix)
        assert sorted(op.started) == sorted([f"{RUN}-curate-1", f"{RUN}-pretrain-1", f"{RUN}-pretrain-2",
                                             f"{RUN}-distill-1", f"{RUN}-eval-1", f"{RUN}-register-1"])
        table = {line.split()[0]: line.split()[1] for line in log2.splitlines()
                 if line.split() and line.split()[0] in ("curate", "pretrain", "distill", "eval", "register")
                 and len(line.split()) > 1 and line.split()[1] in ("cached", "ran", "failed", "blocked")}
        assert table == {"curate": "cached", "pretrain": "ran", "distill": "ran", "eval": "ran",
                         "register": "ran"}, log2[-3000:]
        resumed = stack.cluster.logs(f"{RUN}-pretrain-2-master-0")
        assert "resum" in resumed.lower() and "step-0000000" in resumed, resumed[-3000:]
        summary = stack.s3_json(f"{store}/export/summary.json")
        assert summary["steps"] == 12
        for key in (f"{store}/pipeline/pretrain.yaml", f"{store}/pipeline/state.json",
                    f"{store}/register/_SUCCESS", f"{store}-distill/export/_SUCCESS"):
            assert stack.s3_exists(key), key
        state = stack.s3_json(f"{store}/pipeline/state.json")
        attempts = {s["name"]: (s["status"], s["attempt"]) for s in state["stages"]}
        assert attempts["pretrain"] == ("ran", 2) and attempts["curate"][0] == "cached"
        pretrain = yaml.safe_load(stack.s3().get_object("dinoctl", f"{store}/pipeline/pretrain.yaml").read())
        assert pretrain["train"]["dataset"].endswith("/datasets/k8spipe-curated")
    finally:
        fake.close()
