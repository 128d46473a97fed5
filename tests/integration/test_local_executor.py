"""LocalExecutor: real torchrun replicas with the PyTorchJob environment, restarts, cancel, CLI.

The workload (`tests/workloads/gloo_job.py`) is a real gloo job that checkpoints to a file, so
restarts are observed through what it resumed from, not through mocks.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from app import cli
from app.launch.jobspec import JobSpec
from app.launch.local import LocalExecutor, exit_code, retryable

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = "tests.workloads.gloo_job"


def wait_for(path: Path, timeout: float = 120.0) -> None:
    """Poll for a marker file the workload writes (no timing guesses)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def process_tree(root: int) -> list[int]:
    """`root` and every live process below it, from /proc (independent of the executor's view)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        out += frontier
    return out


def still_running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] not in "ZX":
            alive.append(pid)
    return alive


def job(name: str, out: Path, *extra: str, **kw) -> JobSpec:
    kw.setdefault("replicas", 2)
    return JobSpec(name=name, stage="train", args=("--out", str(out), *extra),
                   entry_module=WORKLOAD, **kw)


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DINOCTL_HOME", str(home))  # what the CLI (`dinoctl status`) reads
    yield home
    cancel_leftovers(home)


def cancel_leftovers(home: Path) -> None:
    """A failed test must not leave detached supervisors and replicas running."""
    ex = LocalExecutor(home=home)
    for status in ex.list():
        if not status.done:
            ex.cancel(status.name)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# ------------------------------------------------------------------------------------------------
# Pure rules
# ------------------------------------------------------------------------------------------------


def test_signal_deaths_map_to_container_exit_codes():
    assert exit_code(-signal.SIGKILL) == 137
    assert exit_code(-signal.SIGTERM) == 143
    assert exit_code(3) == 3


@pytest.mark.parametrize("policy,code,expected", [
    ("OnFailure", 1, True), ("OnFailure", 137, True), ("Never", 137, False),
    ("ExitCode", 1, False), ("ExitCode", 127, False), ("ExitCode", 128, True),
    ("ExitCode", 137, True), ("ExitCode", 255, True),
])
def test_restart_policy_follows_the_operator_exit_code_rule(policy, code, expected):
    assert retryable(policy, code) is expected


# ------------------------------------------------------------------------------------------------
# Real jobs
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_each_replica_sees_the_pytorchjob_environment(tmp_path, home):
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, detach=False, workdir=REPO)
    name = ex.submit(job("envjob", out, "--steps", "1", nproc_per_node=2,
                         env=(("EXTRA_FLAG", "yes"),)))
    status = ex.wait(name, timeout=180)
    assert status.phase == "Succeeded", status.reason
    port = str(ex.store.spec(name).master_port)

    for global_rank in range(4):
        dump = json.loads((out / f"env-{global_rank}.json").read_text())
        node_rank, local_rank = divmod(global_rank, 2)
        pod = dump["launcher"]  # torchrun's own environment = what the operator puts in the pod
        assert pod["MASTER_ADDR"] == "127.0.0.1"
        assert pod["MASTER_PORT"] == port
        assert pod["PET_MASTER_ADDR"] == "127.0.0.1"
        assert pod["PET_MASTER_PORT"] == port
        assert pod["WORLD_SIZE"] == "4"  # replicas x nprocPerNode
        assert pod["RANK"] == str(node_rank)  # node rank: Master 0, Worker i -> i + 1
        assert pod["PET_NODE_RANK"] == str(node_rank)
        assert pod["PET_NNODES"] == "2"
        assert pod["PET_NPROC_PER_NODE"] == "2"
        assert pod["PYTHONUNBUFFERED"] == "1"
        assert pod["EXTRA_FLAG"] == "yes"
        assert pod["DINOCTL_JOB_NAME"] == "envjob"
        assert pod["DINOCTL_REPLICA"] == ("master-0" if node_rank == 0 else "worker-0")
        assert "LOCAL_RANK" not in pod  # only torchrun sets it, per process

        proc = dump["self"]  # what torchrun hands each training process
        assert proc["RANK"] == str(global_rank)
        assert proc["LOCAL_RANK"] == str(local_rank)
        assert proc["WORLD_SIZE"] == "4"
        assert proc["GROUP_RANK"] == str(node_rank)
        assert proc["MASTER_ADDR"] == "127.0.0.1" and proc["MASTER_PORT"] == port
        assert proc["PET_NODE_RANK"] == str(node_rank)
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 4 and result["total"] == 1 + 2 + 3 + 4
    assert (home / "jobs" / name / "master-0.log").read_text().count("step 1") == 2
    assert (home / "jobs" / name / "worker-0.log").exists()


def _kill_worker_when_ready(ex: LocalExecutor, name: str, out: Path) -> tuple[dict, list[int]]:
    """SIGKILL worker-0's torchrun once both replicas reached the hold step (its training process
    is orphaned, as in a pod whose main process died); returns the replicas and all their pids."""
    wait_for(out / "ready-0")
    wait_for(out / "ready-1")
    replicas = ex.store.record(name)["replicas"]
    pids = [p for info in replicas.values() for p in process_tree(info["pid"])]
    assert len(pids) == 4  # two torchrun agents, two training processes
    os.kill(replicas["worker-0"]["pid"], signal.SIGKILL)
    return replicas, pids


@pytest.mark.slow
def test_sigkilled_replica_restarts_the_whole_group_which_resumes_from_its_checkpoint(tmp_path, home):
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, workdir=REPO)  # detached supervisor, like `dinoctl submit`
    name = ex.submit(job("killme", out, "--steps", "4", "--hold-at", "2",
                         restart_policy="OnFailure", backoff_limit=2))
    first, first_pids = _kill_worker_when_ready(ex, name, out)
    status = ex.wait(name, timeout=180)

    assert status.phase == "Succeeded", status.reason
    assert status.restarts == 1
    restarting = [c for c in status.conditions if c.type == "Restarting"]
    assert restarting and restarting[0].status == "False"
    assert "worker-0 exited with code 137 (SIGKILL)" in restarting[0].message
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == 2  # the second attempt started from the step-2 checkpoint
    assert result["total"] == 4 * (1 + 2)  # and continued the same sums to the end
    record = ex.store.record(name)
    assert record["replicas"]["master-0"]["pid"] != first["master-0"]["pid"]  # group restarted
    assert "attempt 2" in (home / "jobs" / name / "master-0.log").read_text()
    assert still_running(first_pids) == []  # the orphaned training process was killed too


@pytest.mark.slow
def test_sigkill_with_backoff_limit_zero_fails_and_status_shows_why(tmp_path, home, capsys):
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, workdir=REPO)
    name = ex.submit(job("nobackoff", out, "--steps", "4", "--hold-at", "1", backoff_limit=0))
    _, pids = _kill_worker_when_ready(ex, name, out)
    status = ex.wait(name, timeout=120)
    assert still_running(pids) == []
    assert status.phase == "Failed" and status.restarts == 0
    assert not (out / "result.json").exists()

    rc, text = run_cli(capsys, "status")
    assert rc == 0
    row = next(line for line in text.splitlines() if line.startswith("nobackoff"))
    assert "Failed" in row and "backoffLimit 0" in row and "SIGKILL" in row
    rc, text = run_cli(capsys, "status", "nobackoff")
    assert "BackoffLimitExceeded" in text
    rc, text = run_cli(capsys, "logs", "nobackoff", "--replica", "worker-0")
    assert rc == 0 and "rank 1: step 1" in text
    rc, text = run_cli(capsys, "logs", "nobackoff", "--replica", "worker-7")
    assert rc == 2 and len(text.strip().splitlines()) == 1 and "worker-7" in text


@pytest.mark.slow
def test_cancel_stops_every_process_of_every_replica(tmp_path, home, capsys):
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, workdir=REPO)
    name = ex.submit(job("cancelme", out, "--steps", "3", "--hold-at", "1", nproc_per_node=2))
    for rank in range(4):
        wait_for(out / f"ready-{rank}")
    pids = [p for info in ex.store.record(name)["replicas"].values()
            for p in process_tree(info["pid"])]
    assert len(pids) == 6  # 2 torchrun agents + 4 training processes

    rc, text = run_cli(capsys, "cancel", name)
    assert rc == 0 and "ancelled" in text
    status = ex.status(name)
    assert status.phase == "Failed" and status.conditions[-1].reason == "Cancelled"
    assert still_running(pids) == []


@pytest.mark.slow
def test_exit_code_policy_treats_torchrun_failure_as_permanent(tmp_path, home):
    # A failing training process makes torchrun exit 1: a permanent error under ExitCode.
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, detach=False, workdir=REPO)
    name = ex.submit(job("permanent", out, "--steps", "1", "--exit-code", "3", replicas=1,
                         restart_policy="ExitCode", backoff_limit=3))
    status = ex.wait(name, timeout=120)
    assert (status.phase, status.restarts) == ("Failed", 0), status.reason
    assert "master-0 exited with code 1" in status.reason and "ExitCode" in status.reason


@pytest.mark.slow
def test_exit_code_policy_restarts_a_replica_killed_by_a_signal(tmp_path, home):
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, detach=False, workdir=REPO)
    name = ex.submit(job("retryable", out, "--steps", "2", "--hold-at", "1", replicas=1,
                         restart_policy="ExitCode", backoff_limit=3))
    wait_for(out / "ready-0")
    os.kill(ex.store.record(name)["replicas"]["master-0"]["pid"], signal.SIGKILL)  # exit code 137
    status = ex.wait(name, timeout=120)
    assert (status.phase, status.restarts) == ("Succeeded", 1), status.reason
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 1


@pytest.mark.slow
def test_active_deadline_fails_a_job_that_runs_too_long(tmp_path, home):
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, detach=False, workdir=REPO)
    name = ex.submit(job("deadline", out, "--steps", "2", "--hold-at", "1", replicas=1,
                         active_deadline_seconds=2))  # it holds forever: never released
    status = ex.wait(name, timeout=120)
    assert status.phase == "Failed" and status.conditions[-1].reason == "DeadlineExceeded"
    assert still_running(ex.store.record(name)["replicas"]["master-0"]["processes"][0][:1]) == []


@pytest.mark.slow
def test_rerun_clones_the_spec_under_a_new_name_and_resumes(tmp_path, home, capsys):
    out = tmp_path / "out"
    ex = LocalExecutor(home=home, workdir=REPO)
    name = ex.submit(job("again", out, "--steps", "2", replicas=1))
    assert ex.wait(name, timeout=120).phase == "Succeeded"

    rc, text = run_cli(capsys, "rerun", name, "--wait")
    assert rc == 0, text
    spec = ex.store.spec("again-r1")
    assert spec.args[-2:] == ("--resume", "auto") and spec.stage == "train"
    assert ex.status("again-r1").phase == "Succeeded"
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 2
    assert ex.store.next_rerun_name("again-r1") == "again-r2"


# ------------------------------------------------------------------------------------------------
# Acceptance: the real pretraining stage, 2 replicas, one SIGKILLed after its first checkpoint.
# ------------------------------------------------------------------------------------------------




def test_a_replica_that_cannot_start_fails_the_job_with_the_reason(tmp_path, home):
    from app.launch.local import Node, Placement

    ex = LocalExecutor(home=home, detach=False, workdir=REPO,
                       placement=Placement(nodes=(Node(prefix=(str(tmp_path / "no-such-launcher"),)),)))
    name = ex.submit(job("nostart", tmp_path / "out", replicas=1))
    status = ex.wait(name, timeout=30)
    assert status.phase == "Failed"
    assert status.conditions[-1].reason == "SupervisorError" and "no-such-launcher" in status.reason
