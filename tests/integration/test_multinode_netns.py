"""Two "nodes" in two network namespaces joined by a veth pair (environment.md §7), one replica
each, started by the LocalExecutor with the PyTorchJob environment: PET_MASTER_ADDR is node 0's
veth address and gloo talks over the veth (GLOO_SOCKET_IFNAME). Needs root and `ip netns`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from app.launch.jobspec import JobSpec
from app.launch.local import LocalExecutor, Node, Placement

REPO = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def two_nodes():
    """Yield a Placement for 2 replicas in namespaces <tag>-n0 / <tag>-n1 (10.231.x.1 / .2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    tag = f"dct{secrets.token_hex(3)}"
    ns = [f"{tag}-n0", f"{tag}-n1"]
    veth = [f"{tag}a", f"{tag}b"]  # interface names are at most 15 characters
    subnet = f"10.231.{int(tag[3:5], 16)}"
    try:
        _ip("netns", "add", ns[0])
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr.strip()}")
    try:
        _ip("netns", "add", ns[1])
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i in (0, 1):
            _ip("link", "set", veth[i], "netns", ns[i])
            _ip("-n", ns[i], "addr", "add", f"{subnet}.{i + 1}/24", "dev", veth[i])
            _ip("-n", ns[i], "link", "set", veth[i], "up")
            _ip("-n", ns[i], "link", "set", "lo", "up")
        yield Placement(master_addr=f"{subnet}.1", nodes=tuple(
            Node(prefix=("ip", "netns", "exec", ns[i]), env=(("GLOO_SOCKET_IFNAME", veth[i]),))
            for i in (0, 1)))
    finally:
        for name in ns:  # deleting a namespace removes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@contextlib.contextmanager
def executor(home: Path, placement: Placement):
    """A LocalExecutor whose unfinished jobs are cancelled on the way out (before the namespaces
    they run in are deleted)."""
    ex = LocalExecutor(home=home, workdir=REPO, placement=placement)
    try:
        yield ex
    finally:
        for status in ex.list():
            if not status.done:
                ex.cancel(status.name)


def wait_for(path: Path, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_gloo_job_across_two_namespaces_restarts_and_resumes(tmp_path):
    with two_nodes() as placement:
        out = tmp_path / "out"
        with executor(tmp_path / "home", placement) as ex:
            name = ex.submit(JobSpec(name="netns-gloo", stage="train", replicas=2,
                                     args=("--out", str(out), "--steps", "4", "--hold-at", "2"),
                                     entry_module="tests.workloads.gloo_job", backoff_limit=1))
            wait_for(out / "ready-0")
            wait_for(out / "ready-1")
            env0 = json.loads((out / "env-0.json").read_text())
            env1 = json.loads((out / "env-1.json").read_text())
            os.kill(ex.store.record(name)["replicas"]["worker-0"]["pid"], signal.SIGKILL)
            status = ex.wait(name, timeout=180)

    assert status.phase == "Succeeded", status.reason
    assert status.restarts == 1
    for rank, env in ((0, env0), (1, env1)):
        pod = env["launcher"]
        assert pod["PET_MASTER_ADDR"] == pod["MASTER_ADDR"] == placement.master_addr
        assert pod["PET_NODE_RANK"] == pod["RANK"] == str(rank)
        assert pod["PET_NNODES"] == "2" and pod["WORLD_SIZE"] == "2"
        assert pod["GLOO_SOCKET_IFNAME"] == dict(placement.nodes[rank].env)["GLOO_SOCKET_IFNAME"]
        assert env["self"]["RANK"] == str(rank)
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == 2 and result["total"] == 4 * 3


@pytest.mark.slow
def test_real_pretraining_across_two_namespaces_checkpoints_and_exports(tmp_path):
    """The real stage (DeepSpeed over gloo) across the two namespaces; killing and resuming a
    replica across them is the gloo job's test above, and the real stage's in test_faults_signals."""
    from tests.workloads import pretrain_case as case

    if not case.pretraining_available():
        pytest.skip("app/train/run.py (the pretraining stage) is not built yet")
    store = tmp_path / "store"
    dataset = case.synth_tiny(store)
    with two_nodes() as placement:
        with executor(tmp_path / "home", placement) as ex:
            name = ex.submit(case.pretrain_spec("netns-pt", store, dataset, tmp_path / "staging"))
            status = ex.wait(name, timeout=400)

    assert status.phase == "Succeeded", status.reason
    assert status.restarts == 0
    assert case.latest_path(store, name).exists()
    assert case.export_success(store, name).exists()
    summary = json.loads((store / "runs" / name / "export" / "summary.json").read_text())
    assert summary["world_size"] == 2
