"""kmock, an in-process stateful Kubernetes API emulator, served on a free port, and a stand-in
for the training operator that runs the PyTorchJobs created in it as local processes.

kmock speaks the real REST paths, so KubernetesExecutor runs its real kubernetes-client calls over
HTTP through a kubeconfig. It does not filter by label selector and serves pod logs only through
a reaction (per pod here).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import kmock
import yaml

NS = "ml"
PYTORCHJOBS = "kubeflow.org/v1/pytorchjobs"
MASTER_LOG = b"step 1 loss 9.1\nstep 2 loss 8.7\n"
WORKER_LOG = b"worker says hi\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeCluster:
    """kmock's KubernetesEmulator served on a free port from its own event-loop thread."""

    def __init__(self, with_crd: bool = True):
        self.with_crd = with_crd
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("kmock did not start within 15 s")

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.k = kmock.KubernetesEmulator()
        if self.with_crd:
            self.k.resources[PYTORCHJOBS] = kmock.ResourceInfo(
                kind="PyTorchJob", namespaced=True, subresources={"status", "scale"},
                verbs={"get", "list", "create", "delete", "patch", "update", "watch"})
        self.k.resources["v1/pods"] = kmock.ResourceInfo(
            kind="Pod", namespaced=True, subresources={"log"}, verbs={"get", "list", "create"})
        self.k[lambda r: r.subresource == "log" and "worker" in (r.name or "")] << WORKER_LOG
        self.k[lambda r: r.subresource == "log" and "master" in (r.name or "")] << MASTER_LOG
        async with self.k, kmock.Server(self.k, port=free_port()) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def forbid(self, method: str) -> None:
        """Every later `method` request answers 403, as an RBAC-less service account gets."""
        self.k[lambda r: str(r.method).upper().endswith(method)] << kmock.KubernetesError(
            status=403, reason="Forbidden",
            message=f'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:{NS}:default" '
                    "cannot create resource \"pytorchjobs\" in API group \"kubeflow.org\"")

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path) -> str:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester",
                                                       "namespace": NS}}],
        }))
        return str(path)



# -- the training operator, played by the LocalExecutor --------------------------------------


def spec_from_pytorchjob(obj: dict, env: dict[str, str]):
    """The JobSpec a PyTorchJob was rendered from (app/launch/render.py), to run it locally: the
    Master container's `torchrun -m <module> <stage> <args...>`, its literal env, replicas,
    processes per node, restart policy, backoff limit and labels. `env` stands in for what the
    pod's Secret and ConfigMap references would give it (S3 endpoint and keys, MLflow)."""
    from app.launch.jobspec import JobSpec

    spec = obj["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    master = replicas["Master"]
    container = master["template"]["spec"]["containers"][0]
    cmd = container["command"]
    i = cmd.index("-m")
    literal = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return JobSpec(name=obj["metadata"]["name"], stage=cmd[i + 2], args=tuple(cmd[i + 3:]),
                   entry_module=cmd[i + 1], replicas=1 + replicas.get("Worker", {}).get("replicas", 0),
                   nproc_per_node=int(spec["nprocPerNode"]), restart_policy=master["restartPolicy"],
                   backoff_limit=int(spec["runPolicy"].get("backoffLimit", 0)),
                   env=tuple({**literal, **env}.items()),
                   labels=tuple((obj["metadata"].get("labels") or {}).items()))


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t or time.time()))


class OperatorStandIn:
    """What every stand-in for the training operator shares: a thread that calls `reconcile()`
    every `poll_s` (errors are collected in `errors`, never a dead thread), the namespace's
    PyTorchJobs as kmock holds them, and writing a job's conditions to its status subresource."""

    def __init__(self, k8s, poll_s: float):
        self.custom, self.namespace, self.poll_s = k8s.custom, k8s.namespace, poll_s
        self.started: list[str] = []  # every job it ever started, in order
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.reconcile()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def reconcile(self) -> None:
        raise NotImplementedError

    def jobs(self) -> list[dict]:
        return self.custom.list_namespaced_custom_object("kubeflow.org", "v1", self.namespace,
                                                         "pytorchjobs")["items"]

    def write_conditions(self, name: str, conditions: list[dict]) -> None:
        """conditions: {type, status, reason, message, time} (time 0: now)."""
        self.custom.patch_namespaced_custom_object_status(
            "kubeflow.org", "v1", self.namespace, "pytorchjobs", name,
            {"status": {"conditions": [{"type": c["type"], "status": c.get("status", "True"),
                                        "reason": c.get("reason") or f"PyTorchJob{c['type']}",
                                        "message": c.get("message", ""),
                                        "lastTransitionTime": _stamp(c.get("time", 0))}
                                       for c in conditions]}})


class LocalOperator(OperatorStandIn):
    """Plays the Kubeflow training operator for a KubernetesExecutor's namespace in kmock: a
    PyTorchJob created there runs as local torchrun processes through a LocalExecutor (its JobSpec
    read back from the job), its conditions are written to the job's status subresource as they
    change, and a job deleted from the API is cancelled."""

    def __init__(self, k8s, local, env: dict[str, str], poll_s: float = 0.1):
        super().__init__(k8s, poll_s)
        self.local, self.env = local, dict(env)
        self._written: dict[str, list] = {}

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for name in self.started:
            if not self.local.status(name).done:
                self.local.cancel(name)

    def reconcile(self) -> None:
        present = set()
        for obj in self.jobs():
            name = obj["metadata"]["name"]
            present.add(name)
            if name not in self.started:
                self.local.submit(spec_from_pytorchjob(obj, self.env))
                self.started.append(name)
            conditions = [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
                           "time": c.time} for c in self.local.status(name).conditions]
            if conditions and conditions != self._written.get(name):
                self.write_conditions(name, conditions)
                self._written[name] = conditions
        for name in self.started:
            if name not in present and not self.local.status(name).done:
                self.local.cancel(name)  # deleted through the API: the operator stops its pods
