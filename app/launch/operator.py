"""What the Kubeflow training operator (v1.9) makes of a PyTorchJob: its pods and Services.

Pure functions over wire-format dicts, written from the operator's documented behaviour and
source (pkg/controller.v1/pytorch: envvar.go, initcontainer.go, pytorchjob_controller.go) so that
tests can run a job the way a cluster would (tests/k8s) and play the operator against kmock:

- one pod per replica: `<job>-master-0`, `<job>-worker-<i>` (replica type lower-cased), and a
  headless Service of the same name selecting it;
- labels `training.kubeflow.org/{operator-name,job-name,replica-type,replica-index}` and
  `job-role=master` on the Master;
- env appended to every container, in this order: PYTHONUNBUFFERED=1, MASTER_PORT,
  PET_MASTER_PORT (the container port named `pytorchjob-port`, else 23456), MASTER_ADDR,
  PET_MASTER_ADDR (`<job>-master-0`), WORLD_SIZE (pods x nprocPerNode; 1 per pod when it is
  not an integer, e.g. "auto"), RANK (Master 0, Worker i+1), PET_NODE_RANK (= RANK),
  PET_NPROC_PER_NODE, PET_NNODES (pods);
- Worker pods get the init container `init-pytorch`, rendered from the operator's template
  (its `--pytorch-init-container-template-file` flag replaces it), which waits until the Master's
  name resolves;
- the pod's restartPolicy is the replica's, except `ExitCode`, which the operator implements
  itself: the pod gets `Never` and a failed pod with an exit code of 128 or more is deleted and
  made again under the same name (`retryable_exit_code`).
"""

from __future__ import annotations

import copy
import re

import yaml

OPERATOR_NAME = "pytorchjob-controller"
DEFAULT_PORT = 23456
PORT_NAME = "pytorchjob-port"
DEFAULT_INIT_IMAGE = "alpine:3.10"  # the operator's --pytorch-init-container-image default
DEFAULT_MAX_TRIES = 100  # --pytorch-init-container-max-tries default

LABEL_OPERATOR = "training.kubeflow.org/operator-name"
LABEL_JOB_NAME = "training.kubeflow.org/job-name"
LABEL_REPLICA_TYPE = "training.kubeflow.org/replica-type"
LABEL_REPLICA_INDEX = "training.kubeflow.org/replica-index"
LABEL_JOB_ROLE = "training.kubeflow.org/job-role"

# The operator's built-in init-container template (initcontainer.go): no securityContext, so a
# namespace enforcing Pod Security "restricted" rejects every Worker pod.
OPERATOR_INIT_TEMPLATE = """\
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits:
      cpu: 100m
      memory: 20Mi
    requests:
      cpu: 50m
      memory: 10Mi
  command: ['sh', '-c', 'err=1;for i in $(seq {{.MaxTries}}); do if nslookup {{.MasterAddr}}; then err=0 && break; fi;echo waiting for master; sleep 2; done; exit $err']
"""

_FIELD = re.compile(r"\{\{\s*\.(MasterAddr|InitContainerImage|MaxTries)\s*\}\}")


class ExpansionError(ValueError):
    """A PyTorchJob the operator would not run as given; the message names the field."""


def master_addr(job_name: str) -> str:
    return f"{job_name}-master-0"


def pod_name(job_name: str, replica_type: str, index: int) -> str:
    return f"{job_name}-{replica_type.lower()}-{index}"


def render_init_containers(template: str, *, master: str, image: str = DEFAULT_INIT_IMAGE,
                           max_tries: int = DEFAULT_MAX_TRIES) -> list[dict]:
    """The init containers of a Worker pod from an operator init-container template (Go
    template fields .MasterAddr, .InitContainerImage, .MaxTries; nothing else is supported)."""
    values = {"MasterAddr": master, "InitContainerImage": image, "MaxTries": str(max_tries)}
    text = _FIELD.sub(lambda m: values[m.group(1)], template)
    if "{{" in text:
        raise ExpansionError(f"init-container template: unsupported field in {text[text.index('{{'):][:40]!r}")
    containers = yaml.safe_load(text)
    if not isinstance(containers, list) or not all(isinstance(c, dict) for c in containers):
        raise ExpansionError("init-container template: must be a YAML list of containers")
    return containers


def nproc_per_node(job: dict) -> int:
    value = str((job.get("spec") or {}).get("nprocPerNode") or "1")
    return int(value) if value.isdigit() else 1  # "auto", "cpu", "gpu": one per pod here


def _master_port(job: dict) -> int:
    master = job["spec"]["pytorchReplicaSpecs"].get("Master")
    if not master:
        return DEFAULT_PORT
    for container in master["template"]["spec"]["containers"]:
        if container.get("name") == "pytorch":
            for port in container.get("ports") or []:
                if port.get("name") == PORT_NAME:
                    return int(port["containerPort"])
    return DEFAULT_PORT


def replicas(job: dict) -> list[tuple[str, int]]:
    """(replica type, index) of every pod, Master first."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    out = []
    for rtype in ("Master", "Worker"):
        if rtype in specs:
            out += [(rtype, i) for i in range(int(specs[rtype].get("replicas", 1)))]
    unknown = set(specs) - {"Master", "Worker"}
    if unknown:
        raise ExpansionError(f"spec.pytorchReplicaSpecs: unknown replica type {sorted(unknown)[0]!r}")
    return out


def pod_restart_policy(replica_policy: str) -> str:
    return "Never" if replica_policy == "ExitCode" else (replica_policy or "Never")


def retryable_exit_code(code: int) -> bool:
    """ExitCode policy: 128+ (signals: preemption, OOM kill, SIGTERM) is retried, 1-127 is not."""
    return code >= 128


def expand(job: dict, *, init_template: str = OPERATOR_INIT_TEMPLATE,
           init_image: str = DEFAULT_INIT_IMAGE, max_tries: int = DEFAULT_MAX_TRIES) -> list[dict]:
    """The Pods and headless Services the operator creates for `job` (a PyTorchJob dict with a
    name), in creation order: for each pod, the Pod then its Service."""
    name = (job.get("metadata") or {}).get("name")
    if not name:
        raise ExpansionError("metadata.name: the job has no name (generateName is resolved by the API server)")
    namespace = job["metadata"].get("namespace", "default")
    specs = job["spec"]["pytorchReplicaSpecs"]
    pods_total = sum(int(s.get("replicas", 1)) for s in specs.values())
    nproc = nproc_per_node(job)
    port = _master_port(job)
    addr = master_addr(name)
    objects: list[dict] = []
    for rtype, index in replicas(job):
        replica = specs[rtype]
        template = copy.deepcopy(replica["template"])
        meta = template.setdefault("metadata", {})
        labels = dict(meta.get("labels") or {})
        labels.update({LABEL_OPERATOR: OPERATOR_NAME, LABEL_JOB_NAME: name,
                       LABEL_REPLICA_TYPE: rtype.lower(), LABEL_REPLICA_INDEX: str(index)})
        if rtype == "Master":
            labels[LABEL_JOB_ROLE] = "master"
        rank = index + 1 if rtype == "Worker" else index
        spec = template["spec"]
        for container in spec["containers"]:
            env = list(container.get("env") or [])
            env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
            if "Master" in specs:
                env += [{"name": "MASTER_PORT", "value": str(port)},
                        {"name": "PET_MASTER_PORT", "value": str(port)},
                        {"name": "MASTER_ADDR", "value": addr},
                        {"name": "PET_MASTER_ADDR", "value": addr}]
            env += [{"name": "WORLD_SIZE", "value": str(pods_total * nproc)},
                    {"name": "RANK", "value": str(rank)},
                    {"name": "PET_NODE_RANK", "value": str(rank)},
                    {"name": "PET_NPROC_PER_NODE", "value": str(job["spec"].get("nprocPerNode", "1"))},
                    {"name": "PET_NNODES", "value": str(pods_total)}]
            container["env"] = env
        if rtype == "Worker" and "Master" in specs:
            spec["initContainers"] = list(spec.get("initContainers") or []) + render_init_containers(
                init_template, master=addr, image=init_image, max_tries=max_tries)
        spec["restartPolicy"] = pod_restart_policy(replica.get("restartPolicy", "Never"))
        pname = pod_name(name, rtype, index)
        objects.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pname, "namespace": namespace, "labels": labels,
                                     "annotations": dict(meta.get("annotations") or {})},
                        "spec": spec})
        selector = {LABEL_JOB_NAME: name, LABEL_REPLICA_TYPE: rtype.lower(),
                    LABEL_REPLICA_INDEX: str(index)}
        objects.append({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": pname, "namespace": namespace, "labels": dict(labels)},
                        "spec": {"clusterIP": "None", "selector": selector,
                                 "ports": [{"name": PORT_NAME, "port": port, "targetPort": port}]}})
    return objects
