"""The chart's jobs, run for real: every pod a container of the CPU image under its own pod spec.

One podman network stands in for the cluster (tests/k8s/cluster.py): the chart's Services resolve
by name, and every pod the chart renders runs unchanged from the images built here: the SeaweedFS
StatefulSet (S3, its PVC, the chart's Secret) and the MLflow Deployment (command, args, env,
probes, PVC) from the services image, the bucket-bootstrap hook and `helm test` pods, then the
pipeline from the chart's own job templates and helm/dinoctl/values-ci.yaml (the CPU image):

    synth (dinoctl submit) -> curate -> pretrain (2 pods) -> distill -> eval -> register (dinoctl submit)

with every artifact in S3 and every run in the MLflow server. Then a pretrain pod is killed mid-run,
its job deleted and created again under a new name (as `kubectl create -f k8s/jobs/pretrain.yaml`
does): it takes over the dead job's lease and resumes from LATEST on the same trajectory.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import pytest
import yaml

from tests.k8s.cluster import PodmanCluster
from tests.k8s.render import ROOT
from tests.k8s.stack import NS, STAGE_TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.k8s]


def generated(job: dict) -> dict:
    """The job as `kubectl create -f` of a generateName manifest makes it: a fresh name."""
    job = yaml.safe_load(yaml.safe_dump(job))
    base = job["metadata"].pop("name", None) or job["metadata"].pop("generateName").rstrip("-")
    job["metadata"].pop("generateName", None)
    job["metadata"]["name"] = f"{base}-{secrets.token_hex(3)[:5]}"
    return job


def dinoctl_render(stage: str, image: str, *args: str) -> dict:
    """What `dinoctl submit <stage> --backend k8s --image <the CPU image>` would create (its dry run)."""
    proc = subprocess.run([sys.executable, "-m", "app.cli", "render", stage, "--backend", "k8s",
                           "--namespace", NS, "--image", image, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_platform_hooks_and_helm_tests_pass(stack):
    cluster = stack.cluster
    assert sorted(k.split("/")[0] for k in cluster.ignored) == ["Role", "RoleBinding", "ServiceAccount"]
    hook = stack.by_kind["Job"]["dinoctl-bucket-bootstrap"]
    pods = [hook, *stack.by_kind["Pod"].values()]  # the bucket hook and the helm test pods
    for obj in pods:
        spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Job" else obj["spec"]
        assert spec["containers"][0]["image"] == stack.services_image, obj["metadata"]["name"]
    assert cluster.run_job(hook, timeout=420) == 0, cluster.logs("dinoctl-bucket-bootstrap-0")
    assert "created bucket dinoctl" in cluster.logs("dinoctl-bucket-bootstrap-0")
    for name, pod in stack.by_kind["Pod"].items():  # the helm test pods
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert cluster.run_job(pod, timeout=300) == 0, cluster.logs(name)
    cluster.check_liveness()


def test_pipeline_from_the_chart_jobs(stack):
    cluster = stack.cluster
    started = time.monotonic()
    times = {}
    synth = dinoctl_render("synth", stack.image, "--config", "demo", "--name", "synth-data")
    stack.run(synth)
    assert stack.s3_exists("store/datasets/synth/ground_truth.json")
    times["synth"] = time.monotonic() - started
    for stage in ("curate", "pretrain", "distill", "eval"):
        t0 = time.monotonic()
        results = stack.run(stack.job(stage))
        times[stage] = time.monotonic() - t0
        if stage == "pretrain":
            assert sorted(results) == ["dinoctl-pretrain-master-0", "dinoctl-pretrain-worker-0"]
    register = dinoctl_render("register", stack.image, "--config", "/etc/dinoctl/configs/eval.yaml",
                              "--name", "register-distill")
    stack.run(register)

    # every artifact in S3
    for key in ("store/curation/curate/selection/_SUCCESS", "store/datasets/ci-curated",
                "store/runs/pretrain/export/_SUCCESS", "store/runs/pretrain/checkpoints/LATEST",
                "store/runs/distill/export/_SUCCESS", "store/runs/distill/eval/_SUCCESS",
                "store/runs/distill/register/_SUCCESS"):
        assert stack.s3_exists(key), key
    pre = stack.s3_json("store/runs/pretrain/export/summary.json")
    assert (pre["world_size"], pre["steps"]) == (2, 12), pre
    ev = stack.s3_json("store/runs/distill/eval/summary.json")
    assert ev["knn"]["top1"]["20"] > 0.0
    # and every run in the MLflow server, artifacts proxied to S3
    exps = stack.mlflow("/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    exp_ids = [e["experiment_id"] for e in exps if e["name"] == "dinoctl"]
    runs = stack.mlflow("/api/2.0/mlflow/runs/search", {"experiment_ids": exp_ids, "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    stages = {t.get("stage") for t in tags}
    assert all(t.get("job_name") for t in tags), tags  # each run names the job that made it
    assert {"curate-run", "pretrain", "distill", "eval", "register"} <= stages, stages
    assert stack.s3_exists("mlflow/"), "no MLflow artifact reached S3"
    cluster.check_liveness()
    print(json.dumps({"stage_seconds": {k: round(v, 1) for k, v in times.items()}}))


def test_killed_pretrain_job_recreated_resumes_on_the_same_trajectory(stack):
    """Same config and data as the pipeline's pretrain, under another run name."""
    cluster = stack.cluster
    reference = stack.s3_json("store/runs/pretrain/export/summary.json")
    job = yaml.safe_load(yaml.safe_dump(stack.job("pretrain")))
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        c = replica["template"]["spec"]["containers"][0]
        c["command"] += ["--set", "run.name=pretrain-killed"]
    first = generated(job)

    def kill_after_first_checkpoint(cl: PodmanCluster, pods: list[str]) -> None:
        deadline = time.monotonic() + STAGE_TIMEOUT
        while not stack.s3_exists("store/runs/pretrain-killed/checkpoints/LATEST"):
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(1)
        cl.kill(pods[0], "SIGKILL")  # the Master: as a node failure or the OOM killer would
    results = cluster.run_pytorchjob(first, timeout=STAGE_TIMEOUT, on_started=kill_after_first_checkpoint)
    assert results[f"{first['metadata']['name']}-master-0"] == 137
    assert results[f"{first['metadata']['name']}-worker-0"] != 0  # its peer died: it ends too
    latest = stack.s3().get_object("dinoctl", "store/runs/pretrain-killed/checkpoints/LATEST").read().decode().strip()
    assert "step-" in latest
    # re-created as `kubectl create -f` would: a new name, the same spec
    second = generated(job)
    stack.run(second)
    logs = cluster.logs(f"{second['metadata']['name']}-master-0")
    assert "resum" in logs.lower(), logs[-3000:]
    assert "taking over the lease" in logs, logs[-3000:]
    resumed = stack.s3_json("store/runs/pretrain-killed/export/summary.json")
    for key, value in reference["final_losses"].items():
        assert resumed["final_losses"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
