"""KubernetesExecutor against kmock, an in-process stateful Kubernetes API emulator.

kmock speaks the real REST paths, so the executor runs its real kubernetes-client calls over HTTP
through a kubeconfig. The test plays the training operator: it patches the PyTorchJob's status
subresource (Created -> Running -> Succeeded, or Failed) and creates the pods with the
operator's labels. kmock does not filter by label selector and serves pod logs only through a
reaction, so logs are served per pod by a reaction declared here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("kmock", reason="kmock is not installed (pip install -e .[dev])")
from kubernetes import client  # noqa: E402

from app.errors import UserError  # noqa: E402
from app.launch.jobspec import JobSpec  # noqa: E402
from app.launch.kubernetes import KubernetesExecutor  # noqa: E402
from app.launch.webhook import validate_pytorchjob  # noqa: E402
from tests.kmock_cluster import NS, FakeCluster, free_port  # noqa: E402


@pytest.fixture
def cluster():
    fake = FakeCluster()
    yield fake
    fake.close()


@pytest.fixture
def executor(cluster, tmp_path):
    return KubernetesExecutor(namespace=NS, kubeconfig=cluster.kubeconfig(tmp_path / "kubeconfig"),
                              poll_interval=0.02)


@pytest.fixture
def operator(executor):
    """Plays the training operator: status patches and pods, through the same API."""
    custom, core = executor.custom, executor.core

    class Operator:
        def set_conditions(self, name, *conditions, **status):
            conds = [{"type": t, "status": s, "reason": f"PyTorchJob{t}", "message": f"job is {t.lower()}",
                      "lastTransitionTime": f"2026-11-26T10:00:0{i}Z"} for i, (t, s) in enumerate(conditions)]
            custom.patch_namespaced_custom_object_status(
                "kubeflow.org", "v1", NS, "pytorchjobs", name,
                {"status": {"conditions": conds, **status}})

        def create_pod(self, job, rtype, index, restarts=0):
            core.create_namespaced_pod(NS, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{job}-{rtype}-{index}", "namespace": NS, "labels": {
                    "training.kubeflow.org/job-name": job,
                    "training.kubeflow.org/replica-type": rtype,
                    "training.kubeflow.org/replica-index": str(index)}},
                "spec": {"containers": [{"name": "pytorch", "image": "img"}]},
                "status": {"containerStatuses": [{"name": "pytorch", "restartCount": restarts,
                                                  "ready": True, "image": "img", "imageID": "",
                                                  "started": True}]},
            })

    return Operator()


def _spec(name="pretrain-a", **kw):
    return JobSpec(name=name, stage="pretrain", args=("--config", "/etc/dinoctl/configs/pretrain.yaml"),
                   replicas=2, nproc_per_node=2, **kw)


def test_submit_creates_a_valid_pytorchjob_in_the_namespace(executor, cluster):
    assert executor.submit(_spec()) == "pretrain-a"
    stored = executor.custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs",
                                                          "pretrain-a")
    assert stored["metadata"]["namespace"] == NS
    assert validate_pytorchjob(stored) == []
    assert stored["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


def test_status_follows_the_operator_conditions_to_success(executor, operator):
    executor.submit(_spec())
    assert executor.status("pretrain-a").phase == "Created"  # no status yet
    operator.set_conditions("pretrain-a", ("Created", "True"))
    assert executor.status("pretrain-a").phase == "Created"
    operator.set_conditions("pretrain-a", ("Created", "True"), ("Running", "True"),
                            startTime="2026-11-26T10:00:00Z")
    operator.create_pod("pretrain-a", "master", 0, restarts=1)
    operator.create_pod("pretrain-a", "worker", 0, restarts=2)
    running = executor.status("pretrain-a")
    assert (running.phase, running.done, running.restarts, running.stage) == ("Running", False, 3, "pretrain")
    operator.set_conditions("pretrain-a", ("Created", "True"), ("Running", "False"),
                            ("Succeeded", "True"), completionTime="2026-11-26T10:05:00Z")
    done = executor.wait("pretrain-a", timeout=5)
    assert done.phase == "Succeeded" and done.done
    assert done.completion_time - done.start_time == 300


def test_failed_job_reports_the_operator_message(executor, operator):
    executor.submit(_spec())
    operator.set_conditions("pretrain-a", ("Created", "True"), ("Running", "False"), ("Failed", "True"))
    status = executor.wait("pretrain-a", timeout=5)
    assert status.phase == "Failed" and status.reason == "job is failed"
    assert [s.name for s in executor.list()] == ["pretrain-a"]


def test_wait_times_out_with_a_one_line_hint(executor, operator):
    executor.submit(_spec())
    operator.set_conditions("pretrain-a", ("Created", "True"), ("Running", "True"))
    with pytest.raises(UserError, match=r"timed out after 0.1s waiting for job pretrain-a \(phase Running\)"):
        executor.wait("pretrain-a", timeout=0.1)


def test_logs_come_from_the_requested_replica_pod(executor, operator):
    executor.submit(_spec())
    operator.create_pod("pretrain-a", "master", 0)
    operator.create_pod("pretrain-a", "worker", 0)
    operator.create_pod("other-job", "master", 0)  # kmock ignores selectors; the executor must not
    assert list(executor.logs("pretrain-a")) == ["step 1 loss 9.1", "step 2 loss 8.7"]
    assert list(executor.logs("pretrain-a", replica="worker-0", follow=True)) == ["worker says hi"]
    with pytest.raises(UserError, match="has no worker-5 pod yet"):
        list(executor.logs("pretrain-a", replica="worker-5"))


def test_cancel_deletes_the_job(executor):
    executor.submit(_spec())
    executor.cancel("pretrain-a")
    with pytest.raises(UserError, match=f"no job named pretrain-a in namespace {NS}"):
        executor.status("pretrain-a")


def test_rerun_clones_the_spec_under_a_new_name_that_resumes(executor, operator):
    executor.submit(_spec())
    operator.set_conditions("pretrain-a", ("Created", "True"), ("Failed", "True"))
    first = executor.rerun("pretrain-a")
    second = executor.rerun(first)
    assert (first, second) == ("pretrain-a-r1", "pretrain-a-r2")
    get = lambda n: executor.custom.get_namespaced_custom_object(  # noqa: E731
        "kubeflow.org", "v1", NS, "pytorchjobs", n)
    old, new, newer = get("pretrain-a"), get(first), get(second)
    assert "status" not in new and new["metadata"]["labels"]["dinoctl.dev/rerun-of"] == "pretrain-a"
    for rtype in ("Master", "Worker"):
        old_c = old["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]
        new_c = new["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]
        assert new_c["command"] == old_c["command"] + ["--resume", "auto"]
        assert {k: v for k, v in new_c.items() if k != "command"} == \
            {k: v for k, v in old_c.items() if k != "command"}
    assert newer["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "command"].count("--resume") == 1
    assert validate_pytorchjob(new) == []
    assert executor.rerun("pretrain-a", new_name="custom-name") == "custom-name"


def test_submitting_a_taken_name_says_to_rerun(executor):
    executor.submit(_spec())
    with pytest.raises(UserError, match=r"a job named pretrain-a already exists in namespace ml: "
                                        r"use `dinoctl rerun pretrain-a`"):
        executor.submit(_spec())


def test_unknown_job_is_a_one_line_error(executor):
    for call in (executor.status, executor.cancel, executor.rerun, lambda n: list(executor.logs(n))):
        with pytest.raises(UserError, match=f"^no job named ghost in namespace {NS}"):
            call("ghost")


def test_missing_crd_gives_the_operator_install_command(tmp_path):
    fake = FakeCluster(with_crd=False)
    try:
        ex = KubernetesExecutor(namespace=NS, kubeconfig=fake.kubeconfig(tmp_path / "kc"))
        for call in (lambda: ex.submit(_spec()), lambda: ex.status("x"), ex.list):
            with pytest.raises(UserError, match=r"PyTorchJob CRD not installed.*kubectl apply "
                                                r"--server-side -k .*standalone\?ref=v1\.9\.4"):
                call()
    finally:
        fake.close()


def test_forbidden_names_the_rbac_fix(executor, cluster):
    executor.submit(_spec("first"))  # discovery + create allowed before RBAC is "removed"
    cluster.forbid("POST")
    with pytest.raises(UserError, match=r"^forbidden: the service account or user cannot create "
                                        r"pytorchjobs.kubeflow.org in namespace ml .*RBAC Role"):
        executor.submit(_spec("second"))


def test_unreachable_api_server_is_a_one_line_error(tmp_path):
    port = free_port()  # nothing listens here
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    cfg.retries = 0
    ex = KubernetesExecutor(namespace=NS, api_client=client.ApiClient(cfg))
    with pytest.raises(UserError, match=f"cannot reach the Kubernetes API at http://127.0.0.1:{port}"):
        ex.status("x")


def test_bad_kubeconfig_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="no usable Kubernetes configuration"):
        KubernetesExecutor(namespace=NS, kubeconfig=str(missing))


def test_rerun_names_count_up_and_stay_dns_labels():
    from app.launch.kubernetes import rerun_name

    assert rerun_name("job", set()) == "job-r1"
    assert rerun_name("job-r3", {"job", "job-r1", "job-r3", "other-r9"}) == "job-r4"
    long = "p" * 63
    name = rerun_name(long, {long})
    assert name.endswith("-r1") and len(name) == 63
