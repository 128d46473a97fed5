"""What every executor offers, and the job status it reports (PyTorchJob condition names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from app.launch.jobspec import JobSpec

# Condition types of a Kubeflow PyTorchJob (kubeflow.org/v1), in lifecycle order.
CONDITIONS = ("Created", "Running", "Restarting", "Succeeded", "Failed")


@dataclass
class Condition:
    type: str
    status: str = "True"  # "True" | "False"
    reason: str = ""
    message: str = ""
    time: float = 0.0


@dataclass
class JobStatus:
    name: str
    stage: str
    phase: str  # the latest true condition: Created | Running | Restarting | Succeeded | Failed
    conditions: list[Condition] = field(default_factory=list)
    restarts: int = 0
    start_time: float = 0.0
    completion_time: float = 0.0
    backend: str = "local"

    @property
    def done(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def reason(self) -> str:
        for cond in reversed(self.conditions):
            if cond.type == self.phase:
                return cond.message or cond.reason
        return ""


class Executor(Protocol):
    backend: str

    def submit(self, spec: JobSpec) -> str: ...
    def status(self, name: str) -> JobStatus: ...
    def list(self) -> list[JobStatus]: ...
    def logs(self, name: str, replica: str = "master-0", follow: bool = False) -> Iterator[str]: ...
    def cancel(self, name: str) -> None: ...
    def rerun(self, name: str, new_name: str | None = None) -> str: ...
    def wait(self, name: str, timeout: float | None = None) -> JobStatus: ...
