"""JobSpec validation and the environment a Kubeflow PyTorchJob (v1.9) injects into each pod."""

from __future__ import annotations

import pytest

from app.launch.jobspec import JobSpec, JobSpecError, pytorchjob_env


def spec(**kw) -> JobSpec:
    kw.setdefault("name", "demo-pretrain")
    kw.setdefault("stage", "pretrain")
    return JobSpec(**kw)


def test_master_pod_environment_matches_the_operator():
    env = pytorchjob_env(spec(replicas=3, nproc_per_node=4), 0, "demo-pretrain-master-0")
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "demo-pretrain-master-0", "PET_MASTER_ADDR": "demo-pretrain-master-0",
        "MASTER_PORT": "23456", "PET_MASTER_PORT": "23456",
        "WORLD_SIZE": "12",  # (1 Master + 2 Workers) x nprocPerNode 4
        "RANK": "0", "PET_NODE_RANK": "0",
        "PET_NNODES": "3", "PET_NPROC_PER_NODE": "4",
    }


@pytest.mark.parametrize("worker_index", [0, 1])
def test_worker_pods_get_node_rank_index_plus_one(worker_index):
    env = pytorchjob_env(spec(replicas=3, nproc_per_node=4, master_port=29500), worker_index + 1,
                         "demo-pretrain-master-0")
    assert env["RANK"] == env["PET_NODE_RANK"] == str(worker_index + 1)
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
    assert env["WORLD_SIZE"] == "12" and env["PET_NNODES"] == "3"
    assert "LOCAL_RANK" not in env  # only torchrun sets it, per process


def test_command_runs_the_entry_module_under_torchrun():
    s = spec(args=("--config", "demo"))
    assert s.command == ["torchrun", "-m", "app.entry", "pretrain", "--config", "demo"]
    assert spec(replicas=2, nproc_per_node=3).world_size == 6


@pytest.mark.parametrize("field,value", [
    ("name", "Bad_Name"), ("name", "1abc"), ("name", "a" * 64), ("stage", "nope"),
    ("replicas", 0), ("nproc_per_node", 0), ("restart_policy", "Sometimes"),
    ("backoff_limit", -1), ("master_port", 70000), ("env", (("1BAD", "x"),)),
])
def test_invalid_fields_are_rejected_by_name(field, value):
    with pytest.raises(JobSpecError, match=field.split("_")[0]):
        spec(**{field: value})


def test_spec_round_trips_through_a_dict():
    s = spec(args=("--config", "demo", "--resume", "auto"), env=(("A", "1"),), labels=(("k", "v"),),
             replicas=2, restart_policy="ExitCode")
    assert JobSpec.from_dict(s.to_dict()) == s
