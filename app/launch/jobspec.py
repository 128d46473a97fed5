"""JobSpec: one stage as a job, independent of where it runs.

The same JobSpec is run by the LocalExecutor (torchrun processes on this machine) and rendered by
the KubernetesExecutor into a Kubeflow PyTorchJob (kubeflow.org/v1). It is validated on
construction, so a bad spec fails before anything starts.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from app import DEFAULT_IMAGE
from app.entry import STAGES  # what `torchrun -m app.entry <stage>` can run

RESTART_POLICIES = ("OnFailure", "ExitCode", "Never", "Always")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class JobSpecError(ValueError):
    """An invalid JobSpec field; the message names the field."""


@dataclass(frozen=True)
class Resources:
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 0


@dataclass(frozen=True)
class JobSpec:
    name: str  # DNS-1035 job name, <= 63 characters
    stage: str  # entry stage: torchrun -m app.entry <stage> ...
    args: tuple[str, ...] = ()  # arguments after the stage, e.g. ("--config", "configs/demo.yaml")
    image: str = DEFAULT_IMAGE  # the versioned GPU image scripts/build-images makes
    replicas: int = 1  # total replicas: 1 Master + (replicas - 1) Workers
    nproc_per_node: int = 1
    resources: Resources = field(default_factory=Resources)
    env: tuple[tuple[str, str], ...] = ()  # extra environment (never secrets: those come from Secrets)
    restart_policy: str = "OnFailure"
    backoff_limit: int = 3
    active_deadline_seconds: int = 0  # 0: no deadline
    master_port: int = 23456
    namespace: str = "default"
    queue: str = ""  # Kueue LocalQueue
    labels: tuple[tuple[str, str], ...] = ()
    entry_module: str = "app.entry"  # the module torchrun runs (tests may point at a workload)
    # SIGTERM -> checkpoint -> exit 143 must fit in the pod's grace; a ViT-g checkpoint takes minutes
    termination_grace_s: int = 300
    tmp_size: str = "50Gi"  # /tmp emptyDir sizeLimit and ephemeral-storage request (staged checkpoints)
    shm_size: str = "16Gi"  # /dev/shm (memory emptyDir) sizeLimit: DataLoader workers, NCCL
    ttl_seconds_after_finished: int = 0  # 0: keep finished jobs

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > 63 or not _DNS1035.match(self.name):
            raise JobSpecError(
                f"name: '{self.name}' is not a DNS-1035 label (lower-case letters, digits and '-', "
                "starting with a letter, at most 63 characters)")
        if self.stage not in STAGES:
            raise JobSpecError(f"stage: '{self.stage}' is not one of {', '.join(STAGES)}")
        if not self.image:
            raise JobSpecError("image: must not be empty")
        if not isinstance(self.termination_grace_s, int) or self.termination_grace_s < 40:
            raise JobSpecError(f"termination_grace_s: must be an integer >= 40 (the checkpoint on "
                               f"SIGTERM needs time), got {self.termination_grace_s!r}")
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise JobSpecError(f"replicas: must be an integer >= 1, got {self.replicas!r}")
        if not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1:
            raise JobSpecError(f"nproc_per_node: must be an integer >= 1, got {self.nproc_per_node!r}")
        if self.restart_policy not in RESTART_POLICIES:
            raise JobSpecError(
                f"restart_policy: '{self.restart_policy}' is not one of {', '.join(RESTART_POLICIES)}")
        if not isinstance(self.backoff_limit, int) or self.backoff_limit < 0:
            raise JobSpecError(f"backoff_limit: must be an integer >= 0, got {self.backoff_limit!r}")
        if self.active_deadline_seconds < 0:
            raise JobSpecError("active_deadline_seconds: must be >= 0")
        if not 1 <= self.master_port <= 65535:
            raise JobSpecError(f"master_port: {self.master_port} is not a valid port")
        if self.resources.gpus < 0:
            raise JobSpecError("resources.gpus: must be >= 0")
        for key, _ in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise JobSpecError(f"env: '{key}' is not a valid variable name")

    @property
    def world_size(self) -> int:
        return self.replicas * self.nproc_per_node

    @property
    def command(self) -> list[str]:
        """The container command; torchrun reads --nnodes/--nproc-per-node/... from PET_* env."""
        return ["torchrun", "-m", self.entry_module, self.stage, *self.args]

    def with_name(self, name: str) -> "JobSpec":
        return replace(self, name=name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        data = dict(data)
        res = data.pop("resources", None) or {}
        for key in ("args", "env", "labels"):
            if key in data and data[key] is not None:
                data[key] = tuple(tuple(x) if isinstance(x, list) else x for x in data[key])
        return cls(resources=Resources(**res), **data)


def pytorchjob_env(spec: JobSpec, node_rank: int, master_addr: str) -> dict[str, str]:
    """The environment the Kubeflow training operator (v1.9) injects into replica `node_rank`.

    Master is node rank 0, Worker i is node rank i + 1. WORLD_SIZE and RANK are node-level values
    (torchrun overrides them per process).
    """
    port = str(spec.master_port)
    return {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": port,
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": port,
        "WORLD_SIZE": str(spec.replicas * spec.nproc_per_node),
        "RANK": str(node_rank),
        "PET_NODE_RANK": str(node_rank),
        "PET_NNODES": str(spec.replicas),
        "PET_NPROC_PER_NODE": str(spec.nproc_per_node),
    }
