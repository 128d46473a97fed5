"""A one-node stand-in for a Kubernetes cluster: pods run as podman containers under their spec.

`PodmanCluster` takes rendered manifests (the chart, k8s/, `dinoctl submit`), keeps ConfigMaps,
Secrets, Services and PVCs, and runs Pods, the pod templates of Deployments / StatefulSets / Jobs
and PyTorchJobs (expanded by app/launch/operator.py exactly as the training operator does) as
containers on one podman network, where every Service name (short, `.ns`, `.ns.svc`,
`.ns.svc.cluster.local`) resolves to the pods it selects.

Strict: every field of a pod spec is either honoured or the pod is refused with `Unhonourable`
naming the field (`translate`), so a test can never pass a spec it did not run:
- command/args (with `$(VAR)` expansion), env (value, ConfigMap/Secret keys incl. optional,
  fieldRef metadata.name/namespace/labels/annotations), workingDir;
- runAsUser/runAsGroup/fsGroup/runAsNonRoot (checked against the image's user),
  readOnlyRootFilesystem (podman --read-only, without podman's own tmpfs mounts),
  allowPrivilegeEscalation=false (no-new-privileges), capabilities drop/add, seccomp
  RuntimeDefault;
- volumes: emptyDir (disk: a host directory owned by fsGroup; Memory: tmpfs of its sizeLimit),
  configMap and secret (files, read-only), persistentVolumeClaim (a host directory that outlives
  pods, chowned per fsGroupChangePolicy);
- resources: memory limits (cgroup), cpu limits; requests must fit this machine; extended
  resources (GPUs, RDMA) are refused;
- probes (httpGet/tcpSocket): readiness gates `wait_ready`, liveness is watched and any failure
  is reported by `check_liveness`; terminationGracePeriodSeconds is the stop timeout;
- restartPolicy Never / OnFailure (the container is started again, emptyDirs kept);
  PyTorchJob ExitCode as the operator does it (a pod that failed with 128+ is made again).
Objects without pods (RBAC, NetworkPolicy, Ingress, ServiceAccount) are recorded in `ignored`:
they are not enforced here (docs/operations.md says so).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.launch import operator

PODMAN = os.environ.get("PODMAN_BIN", "podman")
ROOT = Path(__file__).resolve().parents[2]
PREEMPTED_SIGNALS = ("SIGKILL", "SIGTERM")


class Unhonourable(RuntimeError):
    """A manifest field this harness cannot run as a cluster would: the message names it."""


class PodFailed(RuntimeError):
    """A pod that could not be created (CreateContainerConfigError and the like)."""


def podman(*args: str, check: bool = True, timeout: float = 600, capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PODMAN, *args], capture_output=capture, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}...: {proc.stderr.strip()[-2000:]}")
    return proc


def parse_quantity(text: str | int | float) -> float:
    """Kubernetes quantity -> a float (bytes for memory, cores for cpu)."""
    s = str(text).strip()
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 1e3, "M": 1e6,
             "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * units[suffix]
    return float(s)


def _allow(obj: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise Unhonourable(f"{where}.{extra[0]}: not supported by the podman harness")


@dataclass
class Probe:
    kind: str  # readiness | liveness
    http_path: str | None
    port: int
    period: float
    failure_threshold: int
    initial_delay: float


@dataclass
class Container:
    """One pod's main container (init containers run to completion before it starts)."""
    pod: str
    name: str
    args: list[str]
    init: list[list[str]] = field(default_factory=list)
    restart_policy: str = "Never"
    grace: int = 30
    probes: list[Probe] = field(default_factory=list)
    size_checks: list[tuple[Path, float]] = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    restarts: int = 0
    exit_code: int | None = None


@dataclass
class PodmanCluster:
    network: str
    workdir: Path
    namespace: str = "default"
    images: dict[str, str] = field(default_factory=dict)  # image in a manifest -> local image
    init_template: str = operator.OPERATOR_INIT_TEMPLATE
    init_image: str = operator.DEFAULT_INIT_IMAGE
    configmaps: dict[str, dict] = field(default_factory=dict)
    secrets: dict[str, dict] = field(default_factory=dict)
    services: dict[str, dict] = field(default_factory=dict)
    pvcs: dict[str, Path] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    containers: dict[str, Container] = field(default_factory=dict)
    liveness_failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "PodmanCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        podman("network", "rm", "-f", self.network, check=False)
        podman("network", "create", self.network)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for name in list(self.containers):
            podman("rm", "-f", "-t", "0", name, check=False)
        podman("network", "rm", "-f", self.network, check=False)

    # -- objects ----------------------------------------------------------------------------
    def apply(self, objects: list[dict]) -> list[dict]:
        """Record config objects; return the workloads (Pods, Deployments, Jobs, PyTorchJobs...)."""
        workloads = []
        for obj in objects:
            kind, name = obj["kind"], obj["metadata"].get("name")
            if kind == "ConfigMap":
                self.configmaps[name] = dict(obj.get("data") or {})
            elif kind == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
                data.update(obj.get("stringData") or {})
                self.secrets[name] = data
            elif kind == "Service":
                self.services[name] = obj
            elif kind == "PersistentVolumeClaim":
                path = self.workdir / "pvc" / name
                path.mkdir(parents=True, exist_ok=True)
                self.pvcs[name] = path
            elif kind in ("Pod", "Deployment", "StatefulSet", "Job", "PyTorchJob"):
                workloads.append(obj)
            else:
                self.ignored.append(f"{kind}/{name}")
        return workloads

    def aliases(self, labels: dict) -> list[str]:
        """The DNS names of every Service whose selector matches these pod labels."""
        names = []
        for name, svc in self.services.items():
            selector = (svc.get("spec") or {}).get("selector") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                ns = self.namespace
                names += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        return names

    def pod_from(self, obj: dict, index: int = 0) -> dict:
        """The pod a workload controller makes from its template (Deployment/StatefulSet/Job)."""
        if obj["kind"] == "Pod":
            return obj
        template = obj["spec"]["template"]
        name = f"{obj['metadata']['name']}-{index}"
        spec = json.loads(json.dumps(template["spec"]))
        if obj["kind"] == "StatefulSet":  # each claim template: a PVC <claim>-<pod>, as the controller makes
            for claim in obj["spec"].get("volumeClaimTemplates") or []:
                pvc = f"{claim['metadata']['name']}-{name}"
                path = self.workdir / "pvc" / pvc
                path.mkdir(parents=True, exist_ok=True)
                self.pvcs.setdefault(pvc, path)
                spec.setdefault("volumes", []).append(
                    {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": pvc}})
        return {"metadata": {"name": name,
                             "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                             "annotations": dict((template.get("metadata") or {}).get("annotations") or {})},
                "spec": spec}

    # -- translation: a pod spec -> podman arguments -------------------------------------------
    def _env(self, container: dict, meta: dict, where: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            _allow(item, {"name", "value", "valueFrom"}, f"{where}.env[{item.get('name')}]")
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = _expand(str(item.get("value", "")), env)
                continue
            src = item["valueFrom"]
            if "secretKeyRef" in src or "configMapKeyRef" in src:
                kind = "secretKeyRef" if "secretKeyRef" in src else "configMapKeyRef"
                ref = src[kind]
                store = self.secrets if kind == "secretKeyRef" else self.configmaps
                obj = store.get(ref["name"])
                if obj is None or ref["key"] not in obj:
                    if ref.get("optional"):
                        continue
                    what = "Secret" if kind == "secretKeyRef" else "ConfigMap"
                    raise PodFailed(f"{meta['name']}: CreateContainerConfigError: {what} "
                                    f"{ref['name']!r} key {ref['key']!r} not found (env {name})")
                env[name] = obj[ref["key"]]
            elif "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
                if path == "metadata.name":
                    env[name] = meta["name"]
                elif path == "metadata.namespace":
                    env[name] = self.namespace
                elif m:
                    env[name] = (meta.get(m.group(1)) or {}).get(m.group(2), "")
                else:
                    raise Unhonourable(f"{where}.env[{name}].fieldRef {path}: not supported")
            else:
                raise Unhonourable(f"{where}.env[{name}].valueFrom {sorted(src)}: not supported")
        return env

    def _volume_args(self, pod_spec: dict, container: dict, meta: dict, where: str,
                     fs_group: int | None, ctr: Container) -> list[str]:
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        args: list[str] = []
        for mount in container.get("volumeMounts") or []:
            _allow(mount, {"name", "mountPath", "readOnly", "subPath"}, f"{where}.volumeMounts")
            vol = volumes.get(mount["name"])
            if vol is None:
                raise PodFailed(f"{meta['name']}: volume {mount['name']!r} is not defined")
            _allow(vol, {"name", "emptyDir", "configMap", "secret", "persistentVolumeClaim"},
                   f"{meta['name']}.volumes[{vol['name']}]")
            ro = bool(mount.get("readOnly"))
            dest = mount["mountPath"]
            if "emptyDir" in vol:
                ed = vol["emptyDir"] or {}
                _allow(ed, {"medium", "sizeLimit"}, f"volumes[{vol['name']}].emptyDir")
                if ed.get("medium") == "Memory":
                    size = int(parse_quantity(ed.get("sizeLimit", "1Gi")))
                    args += ["--mount", f"type=tmpfs,destination={dest},tmpfs-size={size},tmpfs-mode=1777"]
                    continue
                if ed.get("medium"):
                    raise Unhonourable(f"volumes[{vol['name']}].emptyDir.medium {ed['medium']!r}")
                host = self.workdir / "pods" / meta["name"] / "emptydir" / vol["name"]
                host.mkdir(parents=True, exist_ok=True)
                _own(host, fs_group, recursive=False)
                if ed.get("sizeLimit"):
                    ctr.size_checks.append((host, parse_quantity(ed["sizeLimit"])))
                src = host
            elif "configMap" in vol or "secret" in vol:
                kind = "configMap" if "configMap" in vol else "secret"
                ref = vol[kind]
                _allow(ref, {"name", "secretName", "items", "defaultMode", "optional"}, f"volumes[{vol['name']}].{kind}")
                name = ref.get("name") or ref.get("secretName")
                data = (self.configmaps if kind == "configMap" else self.secrets).get(name)
                if data is None:
                    raise PodFailed(f"{meta['name']}: {kind} {name!r} for volume {vol['name']!r} not found")
                host = self.workdir / "pods" / meta["name"] / kind / vol["name"]
                if host.exists():
                    shutil.rmtree(host)
                host.mkdir(parents=True)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    target = host / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
                    target.chmod(ref.get("defaultMode", 0o644))
                src, ro = host, True  # ConfigMap and Secret volumes are always read-only
            else:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if claim not in self.pvcs:
                    raise PodFailed(f"{meta['name']}: PersistentVolumeClaim {claim!r} not found")
                src = self.pvcs[claim]
                policy = (pod_spec.get("securityContext") or {}).get("fsGroupChangePolicy", "Always")
                mismatch = fs_group is not None and src.stat().st_gid != fs_group
                _own(src, fs_group, recursive=policy == "Always" or mismatch)
            if mount.get("subPath"):
                src = src / mount["subPath"]
            args += ["-v", f"{src}:{dest}:{'ro' if ro else 'rw'}"]
        return args

    def _probes(self, container: dict, where: str) -> list[Probe]:
        probes = []
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            spec = container.get(kind)
            if not spec:
                continue
            _allow(spec, {"httpGet", "tcpSocket", "periodSeconds", "failureThreshold",
                          "initialDelaySeconds", "timeoutSeconds", "successThreshold"}, f"{where}.{kind}")
            check = spec.get("httpGet") or spec.get("tcpSocket")
            if not check:
                raise Unhonourable(f"{where}.{kind}: only httpGet and tcpSocket probes are supported")
            port = check["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port)
            probes.append(Probe(kind.removesuffix("Probe"), (spec.get("httpGet") or {}).get("path"),
                                int(port), float(spec.get("periodSeconds", 10)),
                                int(spec.get("failureThreshold", 3)), float(spec.get("initialDelaySeconds", 0))))
        return probes

    def translate(self, pod: dict, restart_policy: str | None = None) -> Container:
        """The podman arguments that run `pod`'s main container as Kubernetes would."""
        meta, spec = pod["metadata"], pod["spec"]
        name = meta["name"]
        _allow(spec, {"containers", "initContainers", "volumes", "securityContext", "restartPolicy",
                      "automountServiceAccountToken", "serviceAccountName", "terminationGracePeriodSeconds",
                      "imagePullSecrets", "tolerations", "priorityClassName", "nodeSelector",
                      "enableServiceLinks"}, name)
        if spec.get("automountServiceAccountToken") is not False:
            raise Unhonourable(f"{name}.automountServiceAccountToken: must be false (no API server here)")
        if spec.get("nodeSelector"):
            raise Unhonourable(f"{name}.nodeSelector: this one node has no labels to match")
        psc = spec.get("securityContext") or {}
        _allow(psc, {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile",
                     "fsGroupChangePolicy", "supplementalGroups"}, f"{name}.securityContext")
        if (psc.get("seccompProfile") or {}).get("type", "RuntimeDefault") != "RuntimeDefault":
            raise Unhonourable(f"{name}.securityContext.seccompProfile: only RuntimeDefault")
        policy = restart_policy or spec.get("restartPolicy", "Always")
        if policy not in ("Never", "OnFailure"):
            raise Unhonourable(f"{name}.restartPolicy {policy!r}: only Never and OnFailure (run pods to completion)")
        if len(spec["containers"]) != 1:
            raise Unhonourable(f"{name}.containers: exactly one container is supported")
        ctr = Container(pod=name, name=spec["containers"][0]["name"], args=[], restart_policy=policy,
                        grace=int(spec.get("terminationGracePeriodSeconds", 30)), labels=dict(meta.get("labels") or {}))
        aliases = self.aliases(meta.get("labels") or {})
        for i, c in enumerate(spec.get("initContainers") or []):
            ctr.init.append(self._container_args(pod, c, psc, f"{name}-init-{i}", f"{name}.initContainers[{i}]", ctr, []))
        ctr.args = self._container_args(pod, spec["containers"][0], psc, name, f"{name}.containers[0]", ctr, aliases)
        ctr.probes = self._probes(spec["containers"][0], f"{name}.containers[0]")
        return ctr

    def _container_args(self, pod: dict, c: dict, psc: dict, cname: str, where: str,
                        ctr: Container, aliases: list[str]) -> list[str]:
        meta = pod["metadata"]
        _allow(c, {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "resources",
                   "securityContext", "volumeMounts", "readinessProbe", "livenessProbe", "startupProbe",
                   "workingDir"}, where)
        image = self.images.get(c["image"], c["image"])
        if c.get("imagePullPolicy") == "Always":
            raise Unhonourable(f"{where}.imagePullPolicy Always: nothing can be pulled here")
        if podman("image", "exists", image, check=False).returncode != 0:
            raise PodFailed(f"{meta['name']}: ErrImagePull: {c['image']} (as {image}) is not here")
        sc = c.get("securityContext") or {}
        _allow(sc, {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot", "runAsUser",
                    "runAsGroup", "capabilities", "privileged", "seccompProfile"}, f"{where}.securityContext")
        if sc.get("privileged"):
            raise Unhonourable(f"{where}.securityContext.privileged")
        if (sc.get("seccompProfile") or {}).get("type", "RuntimeDefault") != "RuntimeDefault":
            raise Unhonourable(f"{where}.securityContext.seccompProfile: only RuntimeDefault")
        user = sc.get("runAsUser", psc.get("runAsUser"))
        group = sc.get("runAsGroup", psc.get("runAsGroup"))
        if user is None:
            image_user = podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()
            user = int((image_user or "0").split(":")[0]) if (image_user or "0").split(":")[0].isdigit() else None
            if user is None:
                raise Unhonourable(f"{where}: image user {image_user!r} is not numeric")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) and user == 0:
            raise PodFailed(f"{meta['name']}: CreateContainerConfigError: container has runAsNonRoot and image will run as root")
        args = ["--name", cname, "--hostname", meta["name"], "--network", self.network,
                "--user", f"{user}:{group if group is not None else 0}",
                "--label", "dinoctl-harness=1", "--label", f"dinoctl-harness-pod={meta['name']}"]
        for alias in aliases:
            args += ["--network-alias", alias]
        fs_group = psc.get("fsGroup")
        for g in ([fs_group] if fs_group is not None else []) + list(psc.get("supplementalGroups") or []):
            args += ["--group-add", str(g)]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        caps = sc.get("capabilities") or {}
        _allow(caps, {"drop", "add"}, f"{where}.securityContext.capabilities")
        for cap in caps.get("drop") or []:
            args += ["--cap-drop", cap]
        for cap in caps.get("add") or []:
            args += ["--cap-add", cap]
        res = c.get("resources") or {}
        _allow(res, {"requests", "limits"}, f"{where}.resources")
        for part in ("requests", "limits"):
            for key, value in (res.get(part) or {}).items():
                if key not in ("cpu", "memory", "ephemeral-storage"):
                    raise Unhonourable(f"{where}.resources.{part}.{key}: extended resources cannot be given here")
        req = res.get("requests") or {}
        if "cpu" in req and parse_quantity(req["cpu"]) > os.cpu_count():
            raise Unhonourable(f"{where}.resources.requests.cpu {req['cpu']}: unschedulable on this {os.cpu_count()}-core node")
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if "memory" in req and parse_quantity(req["memory"]) > mem_total:
            raise Unhonourable(f"{where}.resources.requests.memory {req['memory']}: unschedulable here")
        lim = res.get("limits") or {}
        if "memory" in lim:
            args += ["--memory", str(int(parse_quantity(lim["memory"])))]
        if "cpu" in lim:
            args += ["--cpus", f"{parse_quantity(lim['cpu']):g}"]
        env = self._env(c, meta, where)
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        if c.get("workingDir"):
            args += ["--workdir", c["workingDir"]]
        args += self._volume_args(pod["spec"], c, meta, where, fs_group, ctr)
        command = [_expand(a, env) for a in c.get("command") or []]
        cargs = [_expand(a, env) for a in c.get("args") or []]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        elif not cargs:
            pass  # the image's ENTRYPOINT and CMD
        args.append(image)
        args += cargs
        return args

    # -- running ----------------------------------------------------------------------------
    def start(self, pod: dict, restart_policy: str | None = None) -> Container:
        """Create and start the pod (its init containers first, to completion)."""
        ctr = self.translate(pod, restart_policy)
        self.containers[ctr.pod] = ctr
        for i, init in enumerate(ctr.init):
            name = init[init.index("--name") + 1]
            podman("rm", "-f", name, check=False)
            proc = podman("run", "--rm", *init, check=False, timeout=900)
            if proc.returncode != 0:
                raise PodFailed(f"{ctr.pod}: Init:Error: init container {i} exited {proc.returncode}: "
                                f"{(proc.stdout + proc.stderr).strip()[-500:]}")
        podman("rm", "-f", ctr.pod, check=False)
        podman("run", "-d", *ctr.args)
        if any(p.kind == "liveness" for p in ctr.probes):
            threading.Thread(target=self._watch_liveness, args=(ctr,), daemon=True).start()
        return ctr

    def ip(self, pod: str) -> str:
        out = podman("inspect", pod, "--format", "{{json .NetworkSettings.Networks}}").stdout
        return json.loads(out)[self.network]["IPAddress"]

    def _probe_once(self, ctr: Container, probe: Probe) -> bool:
        try:
            host = self.ip(ctr.pod)
            if probe.http_path is None:
                with socket.create_connection((host, probe.port), timeout=2):
                    return True
            conn = http.client.HTTPConnection(host, probe.port, timeout=5)
            conn.request("GET", probe.http_path)
            return 200 <= conn.getresponse().status < 400
        except (OSError, KeyError, RuntimeError, http.client.HTTPException, json.JSONDecodeError):
            return False

    def wait_ready(self, pod: str, timeout: float = 300) -> None:
        ctr = self.containers[pod]
        probes = [p for p in ctr.probes if p.kind == "readiness"]
        deadline = time.monotonic() + timeout
        while not all(self._probe_once(ctr, p) for p in probes):
            if self.state(pod) != "running":
                raise PodFailed(f"{pod}: exited before it was ready:\n{self.logs(pod)[-3000:]}")
            if time.monotonic() > deadline:
                raise PodFailed(f"{pod}: not ready within {timeout:.0f} s:\n{self.logs(pod)[-3000:]}")
            time.sleep(1)

    def _watch_liveness(self, ctr: Container) -> None:
        for probe in (p for p in ctr.probes if p.kind == "liveness"):
            if self._stop.wait(probe.initial_delay):
                return
            failures = 0
            while not self._stop.is_set() and self.state(ctr.pod) == "running":
                failures = 0 if self._probe_once(ctr, probe) else failures + 1
                if failures >= probe.failure_threshold:
                    self.liveness_failures.append(f"{ctr.pod}: liveness probe failed {failures} times")
                    return
                self._stop.wait(probe.period)

    def check_liveness(self) -> None:
        assert not self.liveness_failures, self.liveness_failures

    def state(self, pod: str) -> str:
        proc = podman("inspect", pod, "--format", "{{.State.Status}}", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else "gone"

    def logs(self, pod: str) -> str:
        proc = podman("logs", pod, check=False)
        return proc.stdout + proc.stderr

    def wait(self, pod: str, timeout: float) -> int:
        """Run the pod to its end (restarting it under OnFailure); its last exit code."""
        ctr = self.containers[pod]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{pod}: still running after {timeout:.0f} s:\n{self.logs(pod)[-3000:]}")
            proc = subprocess.run([PODMAN, "wait", pod], capture_output=True, text=True, timeout=left + 5)
            code = int(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else -1
            ctr.exit_code = code
            if code != 0 and ctr.restart_policy == "OnFailure" and ctr.restarts < 6:
                ctr.restarts += 1
                podman("start", pod)
                continue
            for path, limit in ctr.size_checks:
                used = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                if used > limit:
                    raise PodFailed(f"{pod}: Evicted: emptyDir {path.name} used {used} bytes > sizeLimit {limit:.0f}")
            return code

    def kill(self, pod: str, sig: str = "SIGKILL") -> None:
        podman("kill", "-s", sig, pod, check=False)

    def delete(self, pod: str) -> None:
        """Delete as the kubelet does: SIGTERM, then SIGKILL after the grace period."""
        ctr = self.containers.get(pod)
        podman("stop", "-t", str(ctr.grace if ctr else 30), pod, check=False, timeout=(ctr.grace if ctr else 30) + 60)

    # -- controllers ------------------------------------------------------------------------
    def run_service(self, obj: dict) -> str:
        """A Deployment/StatefulSet with one replica: start its pod, wait until it is ready."""
        replicas = int((obj.get("spec") or {}).get("replicas", 1))
        if replicas != 1:
            raise Unhonourable(f"{obj['kind']}/{obj['metadata']['name']}.spec.replicas {replicas}: only 1")
        pod = self.pod_from(obj)
        self.start(pod, restart_policy="OnFailure" if pod["spec"].get("restartPolicy", "Always") == "Always"
                   else None)
        self.wait_ready(pod["metadata"]["name"])
        return pod["metadata"]["name"]

    def run_job(self, obj: dict, timeout: float = 600) -> int:
        """A batch/v1 Job (or a bare Pod) to completion: its pod's exit code."""
        pod = self.pod_from(obj)
        self.start(pod)
        return self.wait(pod["metadata"]["name"], timeout)

    def pytorchjob_pods(self, job: dict) -> list[dict]:
        objects = operator.expand(job, init_template=self.init_template, init_image=self.init_image)
        for svc in (o for o in objects if o["kind"] == "Service"):
            self.services[svc["metadata"]["name"]] = svc
        return [o for o in objects if o["kind"] == "Pod"]

    def run_pytorchjob(self, job: dict, timeout: float = 900,
                       on_started: "callable | None" = None) -> dict[str, int]:
        """Run a PyTorchJob as the operator would; pod name -> final exit code. With restartPolicy
        ExitCode a pod that failed with 128+ is made again under the same name (backoffLimit)."""
        pods = self.pytorchjob_pods(job)
        specs = job["spec"]["pytorchReplicaSpecs"]
        backoff = int((job["spec"].get("runPolicy") or {}).get("backoffLimit", 6))
        policies = {}
        for pod in pods:
            rtype = pod["metadata"]["labels"][operator.LABEL_REPLICA_TYPE].capitalize()
            policies[pod["metadata"]["name"]] = specs[rtype].get("restartPolicy", "Never")
        results: dict[str, int] = {}
        errors: list[BaseException] = []

        def lifecycle(pod: dict) -> None:
            name = pod["metadata"]["name"]
            try:
                self.start(pod)
                while True:
                    code = self.wait(name, timeout)
                    if (code != 0 and policies[name] == "ExitCode" and operator.retryable_exit_code(code)
                            and self.containers[name].restarts < backoff):
                        restarts = self.containers[name].restarts + 1
                        self.start(pod)  # deleted and made again under the same name
                        self.containers[name].restarts = restarts
                        continue
                    results[name] = code
                    return
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                errors.append(exc)

        threads = [threading.Thread(target=lifecycle, args=(p,), daemon=True) for p in pods]
        for t in threads:
            t.start()
        if on_started is not None:
            on_started(self, [p["metadata"]["name"] for p in pods])
        for t in threads:
            t.join(timeout + 120)
        if errors:
            raise errors[0]
        return results


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion in command, args and env values; `$$(` escapes."""
    def repl(m: re.Match) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$?\$\(([A-Za-z_][A-Za-z0-9_]*)\)", repl, text)


def _own(path: Path, gid: int | None, recursive: bool) -> None:
    """What the kubelet does for fsGroup: group-own the volume, group-writable, setgid dirs."""
    if gid is None:
        path.chmod(0o777)
        return
    targets = [path] + (list(path.rglob("*")) if recursive else [])
    for p in targets:
        with contextlib.suppress(FileNotFoundError):
            os.chown(p, -1, gid)
            p.chmod((p.stat().st_mode | 0o060 | (0o2010 if p.is_dir() else 0)) & 0o7777)
