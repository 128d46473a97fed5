"""LocalExecutor: a JobSpec as torchrun processes on this machine, with PyTorchJob semantics.

One `torchrun` per replica (Master = node rank 0, Worker i = node rank i + 1), each in its own
session/process group and with exactly the environment the Kubeflow operator injects into a pod
(`pytorchjob_env`). A supervisor owns the replicas: it applies restartPolicy and backoffLimit by
restarting the WHOLE group (a multi-node torchrun cannot continue with one node gone), enforces
activeDeadlineSeconds, and records conditions in the job directory (`app/launch/store.py`).

The supervisor runs either in a detached process (`python -m app.launch.local supervise <dir>`,
what `dinoctl submit` uses, so status/logs/cancel work from other shells) or in a thread of the
calling process (`LocalExecutor(detach=False)`). Cancel is a request file plus SIGTERM to a
detached supervisor; the supervisor then kills every replica group (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from app.launch.executor import JobStatus
from app.launch.jobspec import JobSpec, pytorchjob_env
from app.launch.procs import (POLL_S, alive_processes, descendants, free_port, is_alive,
                              kill_processes, port_free, start_time)
from app.launch.store import JobStore, new_record, record_to_status, replica_names, set_condition

TRACK_S = 0.25  # how often the supervisor records the processes below each replica
WORKER_GRACE_S = 30.0  # after the Master succeeded, how long Workers may take to exit on their own
# Variables a parent torchrun/launcher may have set; a replica must see only the operator's values.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "GROUP_WORLD_SIZE",
                  "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@dataclass(frozen=True)
class Node:
    """Where one replica runs: a command prefix (e.g. `ip netns exec n0`) and extra env."""
    prefix: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Placement:
    """How replicas map to "nodes". The default is every replica on this host (127.0.0.1)."""
    master_addr: str = "127.0.0.1"
    nodes: tuple[Node, ...] = field(default_factory=tuple)  # by node rank; missing ranks: Node()

    def node(self, rank: int) -> Node:
        return self.nodes[rank] if rank < len(self.nodes) else Node()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        nodes = tuple(Node(tuple(n["prefix"]), tuple(tuple(e) for e in n["env"])) for n in d["nodes"])
        return cls(master_addr=d["master_addr"], nodes=nodes)


def exit_code(returncode: int) -> int:
    """A container's exit code: death by signal N is 128 + N (SIGKILL -> 137)."""
    return 128 - returncode if returncode < 0 else returncode


def retryable(policy: str, code: int) -> bool:
    """restartPolicy: OnFailure/Always restart any failure; ExitCode only 128-255 (the operator's
    rule: 1-127 are permanent errors, 128-255 retryable, e.g. signals); Never none."""
    if policy in ("OnFailure", "Always"):
        return True
    if policy == "ExitCode":
        return 128 <= code <= 255
    return False


def _signal_name(code: int) -> str:
    if code > 128:
        try:
            return f" ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return ""


# ------------------------------------------------------------------------------------------------
# Supervisor: owns the replica processes of one job.
# ------------------------------------------------------------------------------------------------


class Supervisor:
    def __init__(self, job_dir: str | Path, detached: bool = False):
        self.dir = Path(job_dir)
        self.detached = detached  # a process of its own (cancel may signal it) or a thread
        self.store = JobStore(self.dir.parent.parent)
        self.name = self.dir.name
        self.spec = self.store.spec(self.name)
        self.record = self.store.record(self.name)
        self.placement = Placement.from_dict(self.record["placement"])
        self.procs: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def _cancel_requested(self) -> bool:
        return self._stop.is_set() or (self.dir / "cancel").exists()

    def _save(self) -> None:
        self.store.write_record(self.name, self.record)

    def replica_env(self, node_rank: int, replica: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PET_") and k not in _LAUNCHER_VARS}
        env.update(pytorchjob_env(self.spec, node_rank, self.placement.master_addr))
        env.update(dict(self.placement.node(node_rank).env))
        env.update(dict(self.spec.env))
        env.update({"DINOCTL_JOB_NAME": self.spec.name, "DINOCTL_REPLICA": replica,
                    "DINOCTL_RESTART_COUNT": str(self.record["restarts"])})
        return env

    def replica_command(self, node_rank: int) -> list[str]:
        # torchrun takes --nnodes/--nproc-per-node/--node-rank/--master-* from the PET_* env;
        # app.launch.torchrun is the `torchrun` of our images (container exit codes).
        return [*self.placement.node(node_rank).prefix, sys.executable, "-m",
                "app.launch.torchrun", "-m", self.spec.entry_module, self.spec.stage,
                *self.spec.args]

    def _start_group(self) -> None:
        self.record["attempt"] += 1
        self.record["replicas"] = {}
        for rank, replica in enumerate(replica_names(self.spec)):
            with open(self.dir / f"{replica}.log", "ab") as log:
                log.write(f"--- dinoctl: attempt {self.record['attempt']} "
                          f"({time.strftime('%Y-%m-%d %H:%M:%S')}) ---\n".encode())
                log.flush()
                proc = subprocess.Popen(self.replica_command(rank), env=self.replica_env(rank, replica),
                                        cwd=self.record["workdir"], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.procs[replica] = proc
            self.record["replicas"][replica] = {"pid": proc.pid, "pgid": proc.pid, "node_rank": rank,
                                                "exit_code": None,
                                                "processes": [[proc.pid, start_time(proc.pid)]]}
        if not self.record["start_time"]:
            self.record["start_time"] = time.time()
        set_condition(self.record, "Running", "PyTorchJobRunning",
                      f"PyTorchJob {self.name} is running.")
        self._save()

    def _track(self) -> None:
        """Remember every process below each replica's torchrun, so they can be killed even after
        torchrun itself died (its workers would otherwise be orphaned)."""
        changed = False
        for replica, proc in self.procs.items():
            info = self.record["replicas"][replica]
            known = {pid for pid, _ in info["processes"]}
            for pid in descendants(proc.pid):
                if pid not in known:
                    info["processes"].append([pid, start_time(pid)])
                    changed = True
        if changed:
            self._save()

    def _stop_group(self) -> None:
        self._track()
        kill_processes([p.pid for p in self.procs.values()],
                       [pp for r in self.procs for pp in self.record["replicas"][r]["processes"]])
        for replica, proc in self.procs.items():
            proc.wait()
            self.record["replicas"][replica]["exit_code"] = exit_code(proc.returncode)
        self.procs = {}

    def _finish(self, ctype: str, reason: str, message: str) -> str:
        self._stop_group()
        set_condition(self.record, ctype, reason, message)
        self.record["completion_time"] = time.time()
        self._save()
        return ctype

    def run_safely(self) -> str:
        """`run`, but an error in the supervisor itself still kills the replicas and fails the job
        (replicas are never left without an owner)."""
        try:
            return self.run()
        except BaseException as exc:
            self._finish("Failed", "SupervisorError", f"{type(exc).__name__}: {exc}")
            if isinstance(exc, Exception):
                return "Failed"
            raise

    def run(self) -> str:
        """Run the job to completion; returns the final phase (Succeeded or Failed)."""
        if self._cancel_requested():
            set_condition(self.record, "Failed", "Cancelled", "cancelled before it started")
            self._save()
            return "Failed"
        # A thread supervisor shares its host's pid: cancel must not signal that, only use the file.
        self.record["supervisor_pid"] = os.getpid() if self.detached else 0
        self._start_group()
        deadline = self.spec.active_deadline_seconds
        master_done_at = 0.0
        last_track = 0.0
        while True:
            time.sleep(POLL_S)
            if time.monotonic() - last_track > TRACK_S:
                self._track()
                last_track = time.monotonic()
            if self._cancel_requested():
                return self._finish("Failed", "Cancelled", "cancelled by user")
            if not self.dir.exists():  # the job record was deleted: nobody can see or stop it
                self._stop_group()
                return "Failed"
            if deadline and time.time() - self.record["start_time"] > deadline:
                return self._finish("Failed", "DeadlineExceeded",
                                    f"PyTorchJob {self.name} ran past activeDeadlineSeconds={deadline}")
            for replica, proc in self.procs.items():
                rc = proc.poll()
                if rc is not None:
                    self.record["replicas"][replica]["exit_code"] = exit_code(rc)
            if self.procs["master-0"].poll() == 0:
                # The operator marks the job Succeeded when the Master completes; leftover Workers
                # are cleaned up (cleanPodPolicy Running) after a grace period.
                master_done_at = master_done_at or time.time()
                running = [p for p in self.procs.values() if p.poll() is None]
                if not running or time.time() - master_done_at > WORKER_GRACE_S:
                    return self._finish("Succeeded", "PyTorchJobSucceeded",
                                        f"PyTorchJob {self.name} is successfully completed.")
                continue
            failed = next(((r, exit_code(p.returncode)) for r, p in self.procs.items()
                           if p.returncode not in (None, 0)), None)
            if failed is None:
                continue
            replica, code = failed
            what = f"replica {replica} exited with code {code}{_signal_name(code)}"
            if not retryable(self.spec.restart_policy, code):
                return self._finish("Failed", "PyTorchJobFailed",
                                    f"{what}; restartPolicy {self.spec.restart_policy} does not restart it")
            if self.record["restarts"] >= self.spec.backoff_limit:
                return self._finish("Failed", "BackoffLimitExceeded",
                                    f"{what}; reached backoffLimit {self.spec.backoff_limit}")
            self._stop_group()
            self.record["restarts"] += 1
            set_condition(self.record, "Restarting", "PyTorchJobRestarting",
                          f"{what}; restarting all replicas ({self.record['restarts']}/"
                          f"{self.spec.backoff_limit})")
            self._save()
            self._start_group()


# ------------------------------------------------------------------------------------------------
# The executor
# ------------------------------------------------------------------------------------------------


class LocalExecutor:
    backend = "local"

    def __init__(self, home: str | Path | None = None, detach: bool = True,
                 workdir: str | Path | None = None, placement: Placement | None = None):
        self.store = JobStore(home)
        self.detach = detach
        self.workdir = str(Path(workdir or os.getcwd()).resolve())
        self.placement = placement or Placement()
        self._threads: dict[str, threading.Thread] = {}

    def job_dir(self, name: str) -> Path:
        return self.store.job_dir(name)

    def _pick_port(self, spec: JobSpec) -> int:
        taken = set()
        for other in self.store.names():
            try:
                if not record_to_status(self.store.record(other)).done:
                    taken.add(self.store.spec(other).master_port)
            except (FileNotFoundError, ValueError):
                continue
        if spec.master_port not in taken and port_free(spec.master_port):
            return spec.master_port
        while True:
            port = free_port()
            if port not in taken:
                return port

    def submit(self, spec: JobSpec) -> str:
        return self._submit(spec, self.workdir, self.placement)

    def _submit(self, spec: JobSpec, workdir: str, placement: Placement) -> str:
        if self.store.exists(spec.name):
            raise ValueError(f"job '{spec.name}' already exists (use `dinoctl rerun {spec.name}`)")
        spec = dataclasses.replace(spec, master_port=self._pick_port(spec))
        record = new_record(spec, workdir)
        record["placement"] = placement.to_dict()
        job_dir = self.store.create(spec, record)
        if self.detach:
            with open(job_dir / "supervisor.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "app.launch.local", "supervise",
                                         str(job_dir)], cwd=workdir, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONPATH": _pythonpath()})
            (job_dir / "supervisor.pid").write_text(f"{proc.pid}\n")
            # Reap it in the background so it does not linger as a zombie of this process.
            threading.Thread(target=proc.wait, daemon=True).start()
        else:
            sup = Supervisor(job_dir)
            thread = threading.Thread(target=sup.run_safely, name=f"supervise-{spec.name}", daemon=True)
            self._threads[spec.name] = thread
            thread.start()
        return spec.name

    def _supervisor_pid(self, name: str, record: dict) -> int:
        """The detached supervisor's pid (0 for an in-process supervisor thread)."""
        if name in self._threads:
            return 0
        path = self.job_dir(name) / "supervisor.pid"
        return int(path.read_text()) if path.exists() else int(record.get("supervisor_pid") or 0)

    def status(self, name: str) -> JobStatus:
        record = self.store.record(name)
        status = record_to_status(record)
        pid = self._supervisor_pid(name, record)
        if not status.done and pid and not is_alive(pid):
            # Re-read: the supervisor may have written its final status just before exiting.
            record = self.store.record(name)
            status = record_to_status(record)
            if not status.done:
                set_condition(record, "Failed", "SupervisorLost",
                              f"supervisor pid {pid} is gone")
                status = record_to_status(record)
        return status

    def list(self) -> list[JobStatus]:
        return [self.status(n) for n in self.store.names()]

    def replica_pids(self, name: str) -> dict[str, list[int]]:
        """Live pids of every replica: its torchrun and the processes below it."""
        record = self.store.record(name)
        return {r: alive_processes(info["processes"]) for r, info in record["replicas"].items()}

    def logs(self, name: str, replica: str = "master-0", follow: bool = False) -> Iterator[str]:
        spec = self.store.spec(name)
        if replica not in replica_names(spec):
            raise ValueError(f"replica '{replica}' not in job '{name}' "
                             f"(one of {', '.join(replica_names(spec))})")
        path = self.job_dir(name) / f"{replica}.log"
        while follow and not path.exists() and not self.status(name).done:
            time.sleep(0.2)
        if not path.exists():
            return
        with open(path, errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    yield line
                    continue
                if not follow or self.status(name).done:
                    yield from f  # whatever was written between the last read and the end
                    return
                time.sleep(0.2)

    def cancel(self, name: str, timeout: float = 60.0) -> JobStatus:
        """Ask the supervisor to stop; returns once every replica process is gone."""
        record = self.store.record(name)
        if record_to_status(record).done:
            return record_to_status(record)
        (self.job_dir(name) / "cancel").touch()
        pid = self._supervisor_pid(name, record)
        if pid and pid != os.getpid() and is_alive(pid):
            with _suppress():
                os.kill(pid, signal.SIGTERM)
        thread = self._threads.get(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.store.record(name)
            if record_to_status(record).done:
                if thread is not None:
                    thread.join(timeout=max(0.0, deadline - time.monotonic()))
                return record_to_status(record)
            if thread is None and not (pid and is_alive(pid)):
                record = self.store.record(name)
                if record_to_status(record).done:
                    return record_to_status(record)
                break  # no supervisor left to do it: clean up here
            time.sleep(POLL_S)
        kill_processes([info["pgid"] for info in record["replicas"].values()],
                       [pp for info in record["replicas"].values() for pp in info["processes"]])
        set_condition(record, "Failed", "Cancelled", "cancelled by user (supervisor gone)")
        record["completion_time"] = time.time()
        self.store.write_record(name, record)
        return record_to_status(record)

    def rerun(self, name: str, new_name: str | None = None) -> str:
        """Same spec under a new name (`<base>-r<N>`), resuming from the run's LATEST checkpoint."""
        spec = self.store.spec(name)
        args = list(spec.args)
        if "--resume" not in args and not any(a.startswith("--resume=") for a in args):
            args += ["--resume", "auto"]
        new = dataclasses.replace(spec, name=new_name or self.store.next_rerun_name(name),
                                  args=tuple(args))
        record = self.store.record(name)  # same working directory and placement as the original
        return self._submit(new, record["workdir"], Placement.from_dict(record["placement"]))

    def wait(self, name: str, timeout: float | None = None) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(name)
            if status.done:
                thread = self._threads.get(name)
                if thread is not None:
                    thread.join()
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job '{name}' still {status.phase} after {timeout} s")
            time.sleep(0.1)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        return exc_type is not None and issubclass(exc_type, (ProcessLookupError, PermissionError))


def _pythonpath() -> str:
    """Make `app` importable by the detached supervisor wherever it was imported from."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    current = os.environ.get("PYTHONPATH", "")
    return root if not current else f"{root}{os.pathsep}{current}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "supervise":
        print("usage: python -m app.launch.local supervise <job-dir>", file=sys.stderr)
        return 2
    sup = Supervisor(argv[1], detached=True)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    return 0 if sup.run_safely() == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
