"""Local job records: one directory per job under `<home>/jobs/<name>/`.

    spec.json     the JobSpec as submitted (after the master port was chosen)
    status.json   conditions like a PyTorchJob's, restarts, supervisor and replica pids
    <replica>.log one log per replica (`master-0.log`, `worker-0.log`, ...), all attempts appended
    cancel        present once a cancel was requested (the supervisor polls for it)

`status.json` is written atomically (temp file + rename) so readers in other shells never see a
torn file. Only the supervisor writes it while it is alive.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from app.launch.executor import CONDITIONS, Condition, JobStatus
from app.launch.jobspec import JobSpec


def default_home() -> Path:
    """`$DINOCTL_HOME` or `./.dinoctl` (the embedded default of DESIGN.md)."""
    return Path(os.environ.get("DINOCTL_HOME", ".dinoctl")).resolve()


def replica_names(spec: JobSpec) -> list[str]:
    """Replica names by node rank: Master is rank 0, Worker i is rank i + 1."""
    return ["master-0"] + [f"worker-{i}" for i in range(spec.replicas - 1)]


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JobStore:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home).resolve() if home is not None else default_home()
        self.jobs = self.home / "jobs"

    def job_dir(self, name: str) -> Path:
        return self.jobs / name

    def exists(self, name: str) -> bool:
        return (self.job_dir(name) / "spec.json").exists()

    def names(self) -> list[str]:
        if not self.jobs.is_dir():
            return []
        return sorted(p.name for p in self.jobs.iterdir() if (p / "spec.json").exists())

    def create(self, spec: JobSpec, record: dict) -> Path:
        d = self.job_dir(spec.name)
        if d.exists():
            raise ValueError(f"job '{spec.name}' already exists in {self.jobs}")
        d.mkdir(parents=True)
        _atomic_write(d / "spec.json", json.dumps(spec.to_dict(), indent=2) + "\n")
        self.write_record(spec.name, record)
        return d

    def spec(self, name: str) -> JobSpec:
        path = self.job_dir(name) / "spec.json"
        if not path.exists():
            raise FileNotFoundError(f"job '{name}' not found in {self.jobs}")
        return JobSpec.from_dict(json.loads(path.read_text()))

    def record(self, name: str) -> dict:
        """The raw status.json (conditions plus supervisor/replica bookkeeping)."""
        path = self.job_dir(name) / "status.json"
        if not path.exists():
            raise FileNotFoundError(f"job '{name}' not found in {self.jobs}")
        return json.loads(path.read_text())

    def write_record(self, name: str, record: dict) -> None:
        _atomic_write(self.job_dir(name) / "status.json", json.dumps(record, indent=2) + "\n")

    def status(self, name: str) -> JobStatus:
        return record_to_status(self.record(name))

    def next_rerun_name(self, name: str) -> str:
        """`<base>-r<N>` with the first N not used yet; `base` drops an existing `-r<N>` suffix."""
        base = re.sub(r"-r\d+$", "", name)
        n = 1
        while True:
            suffix = f"-r{n}"
            candidate = base[: 63 - len(suffix)].rstrip("-") + suffix
            if not self.exists(candidate):
                return candidate
            n += 1


# ------------------------------------------------------------------------------------------------
# Conditions, with the operator's transitions (release-1.9 `UpdateJobConditions`): one entry per
# type; Running and Restarting are mutually exclusive; a finished job has Running False.
# ------------------------------------------------------------------------------------------------


def new_record(spec: JobSpec, workdir: str) -> dict:
    now = time.time()
    return {
        "name": spec.name, "stage": spec.stage, "backend": "local", "workdir": workdir,
        "conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated",
                        "message": f"PyTorchJob {spec.name} is created.", "time": now}],
        "restarts": 0, "attempt": 0, "created_time": now, "start_time": 0.0,
        "completion_time": 0.0, "supervisor_pid": 0, "replicas": {},
    }


def set_condition(record: dict, ctype: str, reason: str, message: str) -> None:
    assert ctype in CONDITIONS, ctype
    now = time.time()
    conds = record["conditions"]

    def put(t: str, status: str, r: str, m: str) -> None:
        for c in conds:
            if c["type"] == t:
                if c["status"] != status or c["reason"] != r or c["message"] != m:
                    c.update(status=status, reason=r, message=m, time=now)
                return
        if status == "True":
            conds.append({"type": t, "status": status, "reason": r, "message": m, "time": now})

    if ctype in ("Running", "Restarting", "Succeeded", "Failed"):
        for other in ("Running", "Restarting"):
            if other != ctype:
                for c in conds:
                    if c["type"] == other and c["status"] == "True":
                        c.update(status="False", time=now)
    put(ctype, "True", reason, message)


def phase_of(record: dict) -> str:
    true = {c["type"] for c in record["conditions"] if c["status"] == "True"}
    for ctype in ("Failed", "Succeeded", "Restarting", "Running"):
        if ctype in true:
            return ctype
    return "Created"


def record_to_status(record: dict) -> JobStatus:
    return JobStatus(
        name=record["name"], stage=record["stage"], phase=phase_of(record),
        conditions=[Condition(type=c["type"], status=c["status"], reason=c["reason"],
                              message=c["message"], time=c["time"]) for c in record["conditions"]],
        restarts=record.get("restarts", 0),
        start_time=record.get("start_time") or record.get("created_time", 0.0),
        completion_time=record.get("completion_time", 0.0), backend=record.get("backend", "local"),
    )
