"""KubernetesExecutor: run a JobSpec as a Kubeflow PyTorchJob through the Kubernetes API.

Submits the manifest from app/launch/render.py, follows the job's conditions (the operator's
Created/Running/Restarting/Succeeded/Failed), streams pod logs, cancels, and reruns a job by
cloning its spec under a new name with `--resume auto`. API errors become one-line messages that
say what to do (KubernetesError is a UserError, so the CLI prints it without a traceback).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import time
from dataclasses import replace
from typing import Iterator

from app.errors import UserError
from app.launch.executor import Condition, JobStatus
from app.launch.jobspec import JobSpec
from app.launch.render import (CONTAINER, GROUP, LABEL_JOB_NAME, LABEL_REPLICA_INDEX,
                               LABEL_REPLICA_TYPE, LABEL_RERUN_OF, LABEL_STAGE, PLURAL, VERSION,
                               render_pytorchjob)

OPERATOR_INSTALL = ('kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/'
                    'manifests/overlays/standalone?ref=v1.9.4"')
CRD_MISSING = ("PyTorchJob CRD not installed (kubeflow.org/v1 pytorchjobs): install the Kubeflow "
               f"Training Operator v1.9.x: {OPERATOR_INSTALL}")
_RERUN_SUFFIX = re.compile(r"^(?P<base>.+)-r(?P<n>\d+)$")
# Metadata a clone must not carry: the server owns these, and a stale resourceVersion or uid
# makes the create fail.
_SERVER_OWNED = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields",
                 "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences",
                 "finalizers", "generateName")


class KubernetesError(UserError):
    """A Kubernetes API problem, as one line that says what to do."""


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _server_message(exc) -> str:
    try:
        return _first_line(json.loads(exc.body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return _first_line(str(getattr(exc, "reason", "") or exc))


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def parse_replica(replica: str) -> tuple[str, int]:
    """'master-0' -> ('master', 0); 'worker-2' -> ('worker', 2)."""
    match = re.fullmatch(r"(master|worker)-(\d+)", replica.lower())
    if not match:
        raise KubernetesError(f"replica: '{replica}' is not master-0 or worker-<index>")
    return match.group(1), int(match.group(2))


def job_status(obj: dict, restarts: int = 0) -> JobStatus:
    """JobStatus from a PyTorchJob object: the phase is the newest condition whose status is True."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    conditions = [
        Condition(type=c.get("type", ""), status=c.get("status", ""), reason=c.get("reason", ""),
                  message=c.get("message", ""),
                  time=_epoch(c.get("lastTransitionTime") or c.get("lastUpdateTime")))
        for c in status.get("conditions") or []
    ]
    true = [c for c in conditions if c.status == "True"]
    # Terminal conditions win whatever their position; otherwise the newest true one (the
    # operator appends conditions in order and flips Running to False when the job ends).
    terminal = [c for c in true if c.type in ("Succeeded", "Failed")]
    phase = (terminal or true or [Condition(type="Created")])[-1].type
    return JobStatus(
        name=meta.get("name", ""),
        stage=(meta.get("labels") or {}).get(LABEL_STAGE, ""),
        phase=phase,
        conditions=conditions,
        restarts=restarts,
        start_time=_epoch(status.get("startTime")),
        completion_time=_epoch(status.get("completionTime")),
        backend="kubernetes",
    )


def add_resume(container: dict) -> None:
    """Append `--resume auto` to the container's args (or command) unless it resumes already."""
    key = "args" if container.get("args") else "command"
    words = list(container.get(key) or [])
    if "--resume" in [*container.get("command", []), *container.get("args", [])]:
        return
    container[key] = [*words, "--resume", "auto"]


def clone_for_rerun(obj: dict, new_name: str) -> dict:
    """A new PyTorchJob with the spec of `obj`, named `new_name`, resuming from LATEST."""
    meta = obj.get("metadata") or {}
    new_meta = {k: copy.deepcopy(v) for k, v in meta.items() if k not in _SERVER_OWNED}
    new_meta["name"] = new_name
    annotations = {k: v for k, v in (new_meta.get("annotations") or {}).items()
                   if k != "kubectl.kubernetes.io/last-applied-configuration"}
    if annotations:
        new_meta["annotations"] = annotations
    else:
        new_meta.pop("annotations", None)
    new_meta["labels"] = {**(new_meta.get("labels") or {}), LABEL_RERUN_OF: meta.get("name", "")}
    spec = copy.deepcopy(obj.get("spec") or {})
    # Kueue sets suspend on admission; the clone starts from the default and is queued afresh.
    (spec.get("runPolicy") or {}).pop("suspend", None)
    for replica in (spec.get("pytorchReplicaSpecs") or {}).values():
        for container in ((replica.get("template") or {}).get("spec") or {}).get("containers", []):
            if container.get("name") == CONTAINER:
                add_resume(container)
    return {"apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": obj.get("kind", "PyTorchJob"), "metadata": new_meta, "spec": spec}


def rerun_name(name: str, taken: set[str]) -> str:
    """`<base>-r<N>` with the smallest N > any existing rerun of the same base, <= 63 chars."""
    match = _RERUN_SUFFIX.match(name)
    base = match.group("base") if match else name
    numbers = [int(m.group("n")) for other in taken
               if (m := _RERUN_SUFFIX.match(other)) and m.group("base") == base]
    n = max(numbers, default=0) + 1
    suffix = f"-r{n}"
    return f"{base[:63 - len(suffix)].rstrip('-')}{suffix}"


class KubernetesExecutor:
    """Executor on a cluster with the Kubeflow Training Operator v1.9.x."""

    backend = "kubernetes"

    def __init__(self, namespace: str = "default", kubeconfig: str | None = None,
                 context: str | None = None, api_client=None, poll_interval: float = 5.0,
                 render_options: dict | None = None):
        from kubernetes import client

        self.namespace = namespace
        self.poll_interval = poll_interval
        self.render_options = dict(render_options or {})
        self.api_client = api_client or _load_client(kubeconfig, context)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self._crd_checked = False

    # -- errors ---------------------------------------------------------------------------
    def _crd_installed(self) -> bool:
        from kubernetes.client import ApiException

        try:
            found = self.custom.get_api_resources(GROUP, VERSION)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise self._error(exc, "discover", "the kubeflow.org/v1 API") from None
        resources = found.resources if hasattr(found, "resources") else (found or {}).get("resources", [])
        return any((getattr(r, "name", None) or (r.get("name") if isinstance(r, dict) else None)) == PLURAL
                   for r in resources or [])

    def _require_crd(self) -> None:
        if not self._crd_checked:
            if not self._crd_installed():
                raise KubernetesError(CRD_MISSING)
            self._crd_checked = True

    def _error(self, exc, verb: str, what: str, name: str | None = None) -> KubernetesError:
        status = getattr(exc, "status", None)
        said = _server_message(exc)
        if status == 404 and name is not None:
            if not self._crd_installed():
                return KubernetesError(CRD_MISSING)
            return KubernetesError(f"no job named {name} in namespace {self.namespace}: "
                                   "see `dinoctl status` for the jobs there")
        if status == 404:
            return KubernetesError(CRD_MISSING if "pytorchjob" in what else f"{what} not found: {said}")
        if status in (401, 403):
            return KubernetesError(
                f"forbidden: the service account or user cannot {verb} {what} in namespace "
                f"{self.namespace} ({said}); grant it the chart's RBAC Role (helm/dinoctl, "
                "rbac.create=true) or an equivalent RoleBinding")
        if status == 409:
            return KubernetesError(f"a job named {name} already exists in namespace {self.namespace}: "
                                   f"use `dinoctl rerun {name}` or another name")
        if status == 422:
            return KubernetesError(f"the API server rejected job {name}: {said}")
        if status is None or status == 0:
            host = getattr(self.api_client.configuration, "host", "?")
            return KubernetesError(f"cannot reach the Kubernetes API at {host}: {_first_line(str(exc))}; "
                                   "check your kubeconfig and context")
        return KubernetesError(f"Kubernetes API error {status} on {verb} {what}: {said}")

    def _call(self, fn, verb: str, what: str, job: str | None = None, **kwargs):
        import urllib3
        from kubernetes.client import ApiException

        try:
            return fn(**kwargs)
        except ApiException as exc:
            raise self._error(exc, verb, what, job) from None
        except urllib3.exceptions.HTTPError as exc:
            raise self._error(exc, verb, what, job) from None

    def _get(self, name: str) -> dict:
        return self._call(self.custom.get_namespaced_custom_object, "get", "pytorchjobs.kubeflow.org",
                          name, group=GROUP, version=VERSION, namespace=self.namespace,
                          plural=PLURAL, name=name)

    def _create(self, obj: dict) -> dict:
        self._require_crd()
        name = obj["metadata"].get("name") or obj["metadata"].get("generateName", "")
        return self._call(self.custom.create_namespaced_custom_object, "create",
                          "pytorchjobs.kubeflow.org", name, group=GROUP, version=VERSION,
                          namespace=self.namespace, plural=PLURAL, body=obj)

    def _pods(self, name: str, selector: dict[str, str]) -> list:
        labels = {LABEL_JOB_NAME: name, **selector}
        found = self._call(self.core.list_namespaced_pod, "list", "pods", None,
                           namespace=self.namespace,
                           label_selector=",".join(f"{k}={v}" for k, v in labels.items()))
        # Filter again here: selectors are the server's job, but a stale or partial server (or a
        # test double) must not hand us another job's pod.
        return [p for p in found.items
                if all((p.metadata.labels or {}).get(k) == v for k, v in labels.items())]

    # -- Executor protocol -----------------------------------------------------------------
    def render(self, spec: JobSpec) -> dict:
        return render_pytorchjob(replace(spec, namespace=self.namespace), **self.render_options)

    def submit(self, spec: JobSpec) -> str:
        created = self._create(self.render(spec))
        return created["metadata"]["name"]

    def status(self, name: str) -> JobStatus:
        obj = self._get(name)
        restarts = sum(cs.restart_count or 0 for pod in self._pods(name, {})
                       for cs in (pod.status.container_statuses or []) if pod.status)
        return job_status(obj, restarts)

    def list(self) -> list[JobStatus]:
        self._require_crd()
        found = self._call(self.custom.list_namespaced_custom_object, "list",
                           "pytorchjobs.kubeflow.org", None, group=GROUP, version=VERSION,
                           namespace=self.namespace, plural=PLURAL)
        return sorted((job_status(item) for item in found.get("items", [])), key=lambda s: s.name)

    def logs(self, name: str, replica: str = "master-0", follow: bool = False) -> Iterator[str]:
        rtype, index = parse_replica(replica)
        self._get(name)  # a clear "no job named ..." before looking for pods
        pods = self._pods(name, {LABEL_REPLICA_TYPE: rtype, LABEL_REPLICA_INDEX: str(index)})
        if not pods:
            raise KubernetesError(f"job {name} has no {replica} pod yet (or it was cleaned up): "
                                  f"see `dinoctl status {name}`")
        resp = self._call(self.core.read_namespaced_pod_log, "get", "pods/log", None,
                          name=pods[0].metadata.name, namespace=self.namespace,
                          container=CONTAINER, follow=follow, _preload_content=False)
        try:
            pending = b""
            for chunk in resp.stream(amt=65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            resp.release_conn()

    def cancel(self, name: str) -> None:
        self._call(self.custom.delete_namespaced_custom_object, "delete", "pytorchjobs.kubeflow.org",
                   name, group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL,
                   name=name, propagation_policy="Foreground")

    def rerun(self, name: str, new_name: str | None = None) -> str:
        obj = self._get(name)
        if new_name is None:
            taken = {item["metadata"]["name"] for item in self._call(
                self.custom.list_namespaced_custom_object, "list", "pytorchjobs.kubeflow.org", None,
                group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL)["items"]}
            new_name = rerun_name(name, taken)
        created = self._create(clone_for_rerun(obj, new_name))
        return created["metadata"]["name"]

    def wait(self, name: str, timeout: float | None = None) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = job_status(self._get(name))
            if status.done:
                return self.status(name)
            if deadline is not None and time.monotonic() >= deadline:
                raise KubernetesError(f"timed out after {timeout:g}s waiting for job {name} "
                                      f"(phase {status.phase}): `dinoctl status {name}` to look again")
            time.sleep(self.poll_interval if deadline is None
                       else max(0.0, min(self.poll_interval, deadline - time.monotonic())))


def _load_client(kubeconfig: str | None, context: str | None):
    from kubernetes import client, config

    try:
        if kubeconfig or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            # $KUBECONFIG as it is now: the client library reads it once, when first imported
            kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
            return config.new_client_from_config(config_file=kubeconfig, context=context)
        config.load_incluster_config()
        return client.ApiClient()
    except (config.ConfigException, OSError, TypeError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise KubernetesError(f"no usable Kubernetes configuration in {where}: {_first_line(str(exc))}; "
                              "pass --kubeconfig or set KUBECONFIG") from None

