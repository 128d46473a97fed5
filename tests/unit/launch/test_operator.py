"""The training operator's pod expansion (app/launch/operator.py) and Pod Security "restricted"
for what it makes, with the operator's own init container and with ours (k8s/operator/)."""

from pathlib import Path

import pytest
import yaml

from app.launch import operator
from app.launch.jobspec import JobSpec, Resources
from app.launch.render import render_pytorchjob
from tests.k8s import psa

ROOT = Path(__file__).resolve().parents[3]
OUR_TEMPLATE = (ROOT / "k8s" / "operator" / "init-container.yaml").read_text()


def job(replicas=3, nproc=4, policy="OnFailure") -> dict:
    return render_pytorchjob(JobSpec(name="vitg", stage="pretrain", replicas=replicas, nproc_per_node=nproc,
                                     resources=Resources(cpu="8", memory="64Gi", gpus=4),
                                     restart_policy=policy, args=("--config", "vitg14")))


def pods(objs):
    return [o for o in objs if o["kind"] == "Pod"]


def env_of(pod) -> list[tuple[str, str]]:
    return [(e["name"], e.get("value")) for e in pod["spec"]["containers"][0]["env"] if "value" in e]


def test_pod_names_labels_and_one_headless_service_each():
    objs = operator.expand(job())
    names = [p["metadata"]["name"] for p in pods(objs)]
    assert names == ["vitg-master-0", "vitg-worker-0", "vitg-worker-1"]
    services = [o for o in objs if o["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == names
    assert all(s["spec"]["clusterIP"] == "None" for s in services)
    master, worker = pods(objs)[0], pods(objs)[2]
    assert master["metadata"]["labels"][operator.LABEL_JOB_ROLE] == "master"
    assert operator.LABEL_JOB_ROLE not in worker["metadata"]["labels"]
    assert worker["metadata"]["labels"][operator.LABEL_REPLICA_TYPE] == "worker"
    assert worker["metadata"]["labels"][operator.LABEL_REPLICA_INDEX] == "1"
    assert worker["metadata"]["labels"]["dinoctl.dev/stage"] == "pretrain"  # the template's own


def test_injected_env_order_world_size_and_ranks():
    objs = pods(operator.expand(job(replicas=3, nproc=4)))
    injected = ["PYTHONUNBUFFERED", "MASTER_PORT", "PET_MASTER_PORT", "MASTER_ADDR", "PET_MASTER_ADDR",
                "WORLD_SIZE", "RANK", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_NNODES"]
    for i, pod in enumerate(objs):
        env = env_of(pod)
        assert [k for k, _ in env[-len(injected):]] == injected  # appended after the template's
        d = dict(env)
        assert d["MASTER_ADDR"] == d["PET_MASTER_ADDR"] == "vitg-master-0"
        assert d["MASTER_PORT"] == "23456" and d["WORLD_SIZE"] == "12" and d["PET_NNODES"] == "3"
        assert d["RANK"] == d["PET_NODE_RANK"] == str(i) and d["PET_NPROC_PER_NODE"] == "4"
    j = job(replicas=2)
    j["spec"]["nprocPerNode"] = "auto"
    assert dict(env_of(pods(operator.expand(j))[0]))["WORLD_SIZE"] == "2"


def test_exit_code_policy_becomes_never_and_only_signals_are_retried():
    assert {p["spec"]["restartPolicy"] for p in pods(operator.expand(job(policy="ExitCode")))} == {"Never"}
    assert {p["spec"]["restartPolicy"] for p in pods(operator.expand(job(policy="OnFailure")))} == {"OnFailure"}
    assert operator.retryable_exit_code(137) and operator.retryable_exit_code(143)
    assert not operator.retryable_exit_code(1) and not operator.retryable_exit_code(2)


def test_workers_wait_for_the_master_with_the_init_container():
    master, worker, _ = pods(operator.expand(job()))
    assert "initContainers" not in master["spec"]
    (init,) = worker["spec"]["initContainers"]
    assert init["name"] == "init-pytorch" and init["image"] == "alpine:3.10"
    assert "nslookup vitg-master-0" in init["command"][-1] and "seq 100" in init["command"][-1]
    (ours,) = pods(operator.expand(job(), init_template=OUR_TEMPLATE, init_image="img:1", max_tries=7))[1][
        "spec"]["initContainers"]
    assert ours["image"] == "img:1" and "seq 7" in ours["command"][-1]
    assert "getent hosts vitg-master-0" in ours["command"][-1]
    with pytest.raises(operator.ExpansionError, match="unsupported field"):
        operator.render_init_containers("- name: x\n  image: {{.Other}}\n", master="m")


def test_restricted_pod_security_rejects_the_operators_init_container_and_admits_ours():
    worker = pods(operator.expand(job()))[1]
    problems = psa.violations(worker["spec"])
    assert problems and all("init-pytorch" in p for p in problems), problems
    worker = pods(operator.expand(job(), init_template=OUR_TEMPLATE))[1]
    assert psa.violations(worker["spec"]) == []


def test_our_operator_patch_mounts_and_selects_the_template():
    patch = yaml.safe_load((ROOT / "k8s" / "operator" / "operator-patch.yaml").read_text())
    flag = next(op["value"] for op in patch if op["path"].endswith("/args/-"))
    path = flag.split("=", 1)[1]
    mount = next(op["value"][0] for op in patch if op["path"].endswith("/volumeMounts"))
    volume = next(op["value"][0] for op in patch if op["path"].endswith("/volumes"))
    assert flag.startswith("--pytorch-init-container-template-file=")
    assert path == f"{mount['mountPath']}/initContainer.yaml" and mount["name"] == volume["name"]
    kust = yaml.safe_load((ROOT / "k8s" / "operator" / "kustomization.yaml").read_text())
    (gen,) = kust["configMapGenerator"]
    assert gen["name"] == volume["configMap"]["name"] and gen["files"] == ["initContainer.yaml=init-container.yaml"]
    assert "ref=v1.9.4" in kust["resources"][0]


def test_a_job_without_a_name_is_refused():
    j = job()
    j["metadata"].pop("name")
    with pytest.raises(operator.ExpansionError, match="metadata.name"):
        operator.expand(j)
