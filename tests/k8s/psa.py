"""Pod Security Standards, profile "restricted" (Kubernetes 1.33), as the admission controller
checks a pod: what a namespace labelled `pod-security.kubernetes.io/enforce: restricted` rejects.
Written from the published standard (kubernetes.io/docs/concepts/security/pod-security-standards).
"""

from __future__ import annotations

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def violations(pod_spec: dict) -> list[str]:
    out: list[str] = []
    psc = pod_spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            out.append(f"{key}=true")
    for vol in pod_spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {vol['name']}: type {sorted(kinds - ALLOWED_VOLUMES)[0]} not allowed")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser=0")
    containers = [("initContainers", c) for c in pod_spec.get("initContainers") or []] + \
                 [("containers", c) for c in pod_spec.get("containers") or []]
    for kind, c in containers:
        sc = c.get("securityContext") or {}
        who = f"{kind}[{c.get('name')}]"
        if sc.get("privileged"):
            out.append(f"{who}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{who}: allowPrivilegeEscalation != false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{who}: capabilities.drop does not include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{who}: capabilities.add beyond NET_BIND_SERVICE")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{who}: runAsNonRoot != true")
        if sc.get("runAsUser") == 0:
            out.append(f"{who}: runAsUser=0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{who}: seccompProfile is {seccomp!r}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{who}: hostPort")
    return out
