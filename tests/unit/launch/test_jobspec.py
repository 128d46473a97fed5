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


# ------------------------------------------------------------------------------------------------
# JobSpecs built from a config preset (what `dinoctl submit` / `render` / the pipeline use)
# ------------------------------------------------------------------------------------------------


def test_spec_from_config_takes_the_launch_section_and_flags_win():
    from app.config import load_config
    from app.launch.commands import spec_from_config

    cfg = load_config("demo", ["launch.replicas=3", "launch.backoff_limit=5", "launch.cpu=4",
                               "launch.restart_policy=ExitCode"])
    s = spec_from_config(cfg, "pretrain", ["--config", "demo"], replicas=2, nproc_per_node=None)
    assert (s.replicas, s.nproc_per_node, s.backoff_limit, s.restart_policy) == (2, 1, 5, "ExitCode")
    assert s.resources.cpu == "4" and s.namespace == cfg.launch.namespace
    assert s.name.startswith("demo-pretrain-") and s.args == ("--config", "demo")


def test_generated_job_names_are_dns1035_labels():
    from app.launch.commands import dns1035

    assert dns1035("My_Run.v2") == "my-run-v2"
    assert dns1035("42-run") == "j-42-run"
    assert len(dns1035("x" * 100, 20)) == 20


def test_render_prints_a_pytorchjob_for_the_stage(capsys):
    import yaml

    from app import cli

    rc = cli.main(["render", "pretrain", "--config", "demo", "--name", "demo-pt", "--replicas", "3"])
    doc = yaml.safe_load(capsys.readouterr().out)
    assert rc == 0 and doc["kind"] == "PyTorchJob" and doc["metadata"]["name"] == "demo-pt"
    specs = doc["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2


def test_submit_with_a_bad_name_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    from app import cli

    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path))
    rc = cli.main(["submit", "pretrain", "--config", "demo", "--name", "Bad_Name"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "name" in err and not (tmp_path / "jobs").exists()
