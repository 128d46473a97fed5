"""Render a JobSpec into a Kubeflow PyTorchJob (kubeflow.org/v1), as a plain dict in wire format.

The rules here are the ones the training operator's admission webhook enforces (container named
`pytorch`, Master replicas 1, string `nprocPerNode`, DNS-1035 names; see app/launch/webhook.py)
plus the project's pod hardening, which the Helm chart's job templates repeat
(helm/dinoctl/templates/_pytorchjob.tpl). Secrets never appear as literal values: S3 keys come
from a Secret and endpoints from a ConfigMap, both by reference.
"""

from __future__ import annotations

from app.launch.jobspec import JobSpec
from app.launch.operator import LABEL_JOB_NAME, LABEL_REPLICA_INDEX, LABEL_REPLICA_TYPE  # noqa: F401

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the webhook requires one container with this name
PORT_NAME = "pytorchjob-port"

# The labels the operator puts on every pod of a job are app/launch/operator.py's LABEL_*.
# Our own labels. `part-of` is what the chart's NetworkPolicies let through to MinIO and MLflow.
LABEL_STAGE = "dinoctl.dev/stage"
LABEL_RERUN_OF = "dinoctl.dev/rerun-of"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
PART_OF = {"app.kubernetes.io/part-of": "dinoctl"}

CONFIG_MOUNT = "/etc/dinoctl/configs"  # where a stage-config ConfigMap is mounted
STAGE_CONFIGS = "dinoctl-configs"  # the chart's stage-config ConfigMap (release "dinoctl")
RUN_AS_USER = 1000  # the image's non-root user (docker/Dockerfile)

# Keys of the chart's Secret / ConfigMap (helm/dinoctl/templates/{secret,configmap-settings}.yaml).
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SETTINGS_KEYS = ("S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DINOCTL_STORE")
# What the process may spend on its SIGTERM checkpoint: the pod's grace less this margin for
# torchrun's own shutdown (it SIGKILLs workers DINOCTL_SIGTERM_GRACE_S + 5 s after SIGTERM).
GRACE_MARGIN_S = 30


def sigterm_grace_s(termination_grace_s: int) -> int:
    return max(10, termination_grace_s - GRACE_MARGIN_S)


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of a volume on every start
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    # The root filesystem stays read-only: everything the process writes goes to /tmp (emptyDir),
    # HOME points there, and DeepSpeed ops are prebuilt in the image (no JIT builds at run time).
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _env(spec: JobSpec, s3_secret: str | None, settings_configmap: str | None) -> list[dict]:
    env: list[dict] = []
    if s3_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key}}}
                for key in S3_SECRET_KEYS]
    if settings_configmap:
        # optional: a settings key the chart does not set simply stays unset in the pod.
        env += [{"name": key, "valueFrom": {"configMapKeyRef": {
            "name": settings_configmap, "key": key, "optional": True}}} for key in SETTINGS_KEYS]
    # Tags for MLflow runs. The job name comes from the operator's pod label, so it is right for
    # generateName jobs and for reruns that clone this spec under another name.
    env += [
        {"name": "DINOCTL_JOB_NAME", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.labels['{LABEL_JOB_NAME}']"}}},
        {"name": "DINOCTL_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "DINOCTL_IMAGE", "value": spec.image},
        {"name": "HOME", "value": "/tmp"},
        {"name": "DINOCTL_SIGTERM_GRACE_S", "value": str(sigterm_grace_s(spec.termination_grace_s))},
    ]
    taken = {item["name"] for item in env}
    for key, value in spec.env:
        if key in taken:  # duplicate names are an error under server-side apply (Helm 4)
            raise ValueError(f"env: '{key}' is set by the renderer; remove it from the job's env")
        env.append({"name": key, "value": str(value)})
        taken.add(key)
    return env


def _resources(spec: JobSpec) -> dict:
    res = spec.resources
    requests = {"cpu": res.cpu, "memory": res.memory, "ephemeral-storage": spec.tmp_size}
    limits = {"memory": res.memory}
    if res.gpus:
        # Extended resources must be set in limits; requests default to the same value.
        requests["nvidia.com/gpu"] = str(res.gpus)
        limits["nvidia.com/gpu"] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def _pod_template(spec: JobSpec, *, s3_secret, settings_configmap, service_account,
                  config_configmap) -> dict:
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": spec.tmp_size}},
        # dataloader workers and NCCL use shared memory; the container default (64 MiB) is too small
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
    ]
    if config_configmap:
        mounts.append({"name": "configs", "mountPath": CONFIG_MOUNT, "readOnly": True})
        volumes.append({"name": "configs", "configMap": {"name": config_configmap}})
    container = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(spec.command),
        "env": _env(spec, s3_secret, settings_configmap),
        "ports": [{"name": PORT_NAME, "containerPort": spec.master_port, "protocol": "TCP"}],
        "resources": _resources(spec),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    pod_spec: dict = {
        "automountServiceAccountToken": False,  # stage code never talks to the Kubernetes API
        "terminationGracePeriodSeconds": spec.termination_grace_s,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    return {
        "metadata": {
            "labels": {**PART_OF, "app.kubernetes.io/name": "dinoctl",
                       "app.kubernetes.io/component": spec.stage, LABEL_STAGE: spec.stage},
            # Istio sidecars never exit, so pods would never complete (kubeflow/trainer#1577).
            "annotations": {"sidecar.istio.io/inject": "false"},
        },
        "spec": pod_spec,
    }


def render_pytorchjob(spec: JobSpec, *, s3_secret: str | None = "dinoctl-s3",
                      settings_configmap: str | None = "dinoctl-settings",
                      service_account: str | None = None, config_configmap: str | None = None,
                      generate_name: bool = False) -> dict:
    """The PyTorchJob for `spec`: Master (1 replica) + Worker (replicas - 1), container `pytorch`.

    With `generate_name`, metadata carries `generateName: <name>-` instead of a name (for
    `kubectl create -f`, which gives every submission a fresh name).
    """
    if config_configmap is None and any(str(a).startswith(CONFIG_MOUNT + "/") for a in spec.args):
        config_configmap = STAGE_CONFIGS  # `--config /etc/dinoctl/configs/x.yaml`: mount them

    def template() -> dict:  # a fresh object per replica type: editing one never edits both
        return _pod_template(spec, s3_secret=s3_secret, settings_configmap=settings_configmap,
                             service_account=service_account, config_configmap=config_configmap)

    replica_specs = {"Master": {"replicas": 1, "restartPolicy": spec.restart_policy,
                                "template": template()}}
    if spec.replicas > 1:
        replica_specs["Worker"] = {"replicas": spec.replicas - 1,
                                   "restartPolicy": spec.restart_policy, "template": template()}
    run_policy: dict = {"cleanPodPolicy": "Running", "backoffLimit": spec.backoff_limit}
    if spec.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished:
        run_policy["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    labels = {**PART_OF, "app.kubernetes.io/name": "dinoctl", "app.kubernetes.io/managed-by": "dinoctl",
              "app.kubernetes.io/component": spec.stage, LABEL_STAGE: spec.stage, **dict(spec.labels)}
    if spec.queue:
        labels[LABEL_QUEUE] = spec.queue
    metadata: dict = {"namespace": spec.namespace, "labels": labels}
    if generate_name:
        metadata["generateName"] = f"{spec.name}-"
    else:
        metadata["name"] = spec.name
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(spec.nproc_per_node),  # a string in the CRD: "8", not 8
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }
