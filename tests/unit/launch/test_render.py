"""render_pytorchjob: a JobSpec becomes a PyTorchJob that the operator's webhook accepts."""

from __future__ import annotations

import pytest

from app.launch.jobspec import JobSpecError, JobSpec, Resources
from app.launch.render import render_pytorchjob
from app.launch.webhook import validate_pytorchjob


def _containers(job, rtype="Master"):
    return job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"]


def _env(container):
    return {e["name"]: e for e in container["env"]}


def test_replicas_split_into_one_master_and_the_rest_workers():
    job = render_pytorchjob(JobSpec(name="p", stage="pretrain", replicas=4, nproc_per_node=8))
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 3)
    assert job["spec"]["nprocPerNode"] == "8"
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")


def test_single_replica_job_has_no_worker():
    job = render_pytorchjob(JobSpec(name="p", stage="eval"))
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_container_is_named_pytorch_and_runs_the_spec_command():
    spec = JobSpec(name="p", stage="distill", args=("--config", "c.yaml"), replicas=2)
    job = render_pytorchjob(spec)
    for rtype in ("Master", "Worker"):
        (container,) = _containers(job, rtype)
        assert container["name"] == "pytorch"
        assert container["command"] == ["torchrun", "-m", "app.entry", "distill", "--config", "c.yaml"]
        assert container["ports"][0]["containerPort"] == spec.master_port


def test_master_and_worker_templates_are_independent_objects():
    job = render_pytorchjob(JobSpec(name="p", stage="pretrain", replicas=2))
    _containers(job, "Master")[0]["command"].append("--resume")
    assert "--resume" not in _containers(job, "Worker")[0]["command"]


def test_run_policy_cleans_running_pods_and_keeps_limits():
    job = render_pytorchjob(JobSpec(name="p", stage="pretrain", backoff_limit=7,
                                    active_deadline_seconds=3600, restart_policy="ExitCode"))
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 7,
                                        "activeDeadlineSeconds": 3600}
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "ExitCode"
    no_deadline = render_pytorchjob(JobSpec(name="p", stage="pretrain"))
    assert "activeDeadlineSeconds" not in no_deadline["spec"]["runPolicy"]


def test_gpus_go_into_requests_and_limits():
    job = render_pytorchjob(JobSpec(name="p", stage="pretrain",
                                    resources=Resources(cpu="16", memory="64Gi", gpus=8)))
    res = _containers(job)[0]["resources"]
    assert res["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "8"}
    assert res["requests"] == {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "50Gi",
                               "nvidia.com/gpu": "8"}
    cpu_only = _containers(render_pytorchjob(JobSpec(name="p", stage="eval")))[0]["resources"]
    assert "nvidia.com/gpu" not in cpu_only["limits"]


def test_secrets_come_by_reference_and_literals_only_from_the_spec():
    spec = JobSpec(name="p", stage="pretrain", image="reg/dinoctl:1", env=(("NCCL_DEBUG", "WARN"),))
    env = _env(_containers(render_pytorchjob(spec, s3_secret="s3-keys", settings_configmap="st"))[0])
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "st"
    assert env["DINOCTL_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['training.kubeflow.org/job-name']"
    assert env["DINOCTL_IMAGE"]["value"] == "reg/dinoctl:1"
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    literal = {name for name, e in env.items() if "value" in e}
    assert literal == {"DINOCTL_IMAGE", "HOME", "NCCL_DEBUG", "DINOCTL_SIGTERM_GRACE_S"}


def test_without_secret_and_settings_no_references_are_rendered():
    env = _env(_containers(render_pytorchjob(JobSpec(name="p", stage="eval"), s3_secret=None,
                                             settings_configmap=None))[0])
    assert "AWS_ACCESS_KEY_ID" not in env and "S3_ENDPOINT_URL" not in env


def test_env_that_shadows_a_rendered_variable_is_rejected():
    with pytest.raises(ValueError, match="env: 'HOME' is set by the renderer"):
        render_pytorchjob(JobSpec(name="p", stage="eval", env=(("HOME", "/root"),)))


def test_pods_are_hardened_non_root_and_sidecar_free():
    job = render_pytorchjob(JobSpec(name="p", stage="pretrain", replicas=2), service_account="sa")
    for rtype in ("Master", "Worker"):
        template = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["serviceAccountName"] == "sa"
        sc = pod["containers"][0]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/tmp", "/dev/shm"}
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_queue_and_labels_are_on_the_job():
    job = render_pytorchjob(JobSpec(name="p", stage="curate", queue="team-a",
                                    labels=(("team", "vision"),)))
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["team"] == "vision" and labels["dinoctl.dev/stage"] == "curate"
    assert "kueue.x-k8s.io/queue-name" not in render_pytorchjob(
        JobSpec(name="p", stage="curate"))["metadata"]["labels"]


def test_config_configmap_is_mounted_read_only():
    job = render_pytorchjob(JobSpec(name="p", stage="pretrain"), config_configmap="stage-configs")
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "configs")
    assert mount == {"name": "configs", "mountPath": "/etc/dinoctl/configs", "readOnly": True}
    assert {"name": "configs", "configMap": {"name": "stage-configs"}} in pod["volumes"]


def test_generate_name_replaces_the_name():
    meta = render_pytorchjob(JobSpec(name="pretrain", stage="pretrain"), generate_name=True)["metadata"]
    assert meta["generateName"] == "pretrain-" and "name" not in meta


@pytest.mark.parametrize("spec", [
    JobSpec(name="a", stage="eval"),
    JobSpec(name="pretrain-vitg14-" + "x" * 47, stage="pretrain", replicas=16, nproc_per_node=8,
            resources=Resources(gpus=8), queue="q", restart_policy="ExitCode"),
    JobSpec(name="curate-1", stage="curate", replicas=3, restart_policy="Never", backoff_limit=0),
])
def test_rendered_jobs_pass_the_webhook_rules(spec):
    assert validate_pytorchjob(render_pytorchjob(spec)) == []


def test_pods_get_time_to_checkpoint_on_sigterm_and_bounded_scratch_space():
    """terminationGracePeriodSeconds covers the SIGTERM checkpoint (DINOCTL_SIGTERM_GRACE_S is
    what the process may spend, torchrun's own shutdown fits in the rest); /tmp and /dev/shm are
    bounded and /tmp's size is requested as ephemeral storage; finished jobs may expire."""
    spec = JobSpec(name="p", stage="pretrain", termination_grace_s=600, tmp_size="200Gi", shm_size="64Gi",
                   ttl_seconds_after_finished=3600)
    job = render_pytorchjob(spec)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 600
    env = _env(pod["containers"][0])
    grace = int(env["DINOCTL_SIGTERM_GRACE_S"]["value"])
    assert grace + 5 < 600 and grace >= 500  # torchrun SIGKILLs workers at grace + 5 s
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["tmp"]["emptyDir"] == {"sizeLimit": "200Gi"}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "200Gi"
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 3600
    with pytest.raises(JobSpecError, match="termination_grace_s"):
        JobSpec(name="p", stage="pretrain", termination_grace_s=5)


def test_chart_stage_config_paths_mount_the_chart_configs():
    job = render_pytorchjob(JobSpec(name="r", stage="register", args=("--config", "/etc/dinoctl/configs/eval.yaml")))
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {"name": "configs", "configMap": {"name": "dinoctl-configs"}} in pod["volumes"]
    plain = render_pytorchjob(JobSpec(name="r", stage="register", args=("--config", "demo")))
    assert all(v["name"] != "configs" for v in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"])
