"""validate_pytorchjob: the training operator's admission rules, checked offline."""

from __future__ import annotations

import copy

import pytest

from app.launch.jobspec import JobSpec
from app.launch.render import render_pytorchjob
from app.launch.webhook import validate_pytorchjob

GOOD = render_pytorchjob(JobSpec(name="good", stage="pretrain", replicas=2))


def _bad(edit):
    job = copy.deepcopy(GOOD)
    edit(job)
    return validate_pytorchjob(job)


def _master(job):
    return job["spec"]["pytorchReplicaSpecs"]["Master"]


def test_the_rendered_job_passes():
    assert validate_pytorchjob(GOOD) == []


@pytest.mark.parametrize("edit, message", [
    (lambda j: _master(j)["template"]["spec"]["containers"][0].update(name="main"),
     "Master.template.spec.containers: one container must be named 'pytorch'"),
    (lambda j: _master(j).update(replicas=2), "Master.replicas: must be 1"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0), "Worker.replicas: must be >= 1"),
    (lambda j: j["spec"].update(nprocPerNode=8), "spec.nprocPerNode: must be a string"),
    (lambda j: j["spec"].update(nprocPerNode="eight"), "spec.nprocPerNode: must be a string"),
    (lambda j: j["metadata"].update(name="Pretrain_1"), "metadata.name: 'Pretrain_1' is not a DNS-1035"),
    (lambda j: j["metadata"].update(name="1pretrain"), "is not a DNS-1035"),
    (lambda j: j["metadata"].update(name="p" * 64), "is not a DNS-1035"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=_master(j)), "Chief: replica type must be"),
    (lambda j: _master(j)["template"]["spec"]["containers"][0].pop("image"), "containers[0].image: must be set"),
    (lambda j: _master(j)["template"]["spec"].update(containers=[]), "at least one container"),
    (lambda j: _master(j).update(restartPolicy="Sometimes"), "restartPolicy: 'Sometimes'"),
    (lambda j: j["spec"]["runPolicy"].update(cleanPodPolicy="Later"), "cleanPodPolicy: 'Later'"),
    (lambda j: j["spec"]["runPolicy"].update(managedBy="me"), "managedBy: 'me'"),
    (lambda j: j["spec"].pop("pytorchReplicaSpecs"), "spec.pytorchReplicaSpecs: must list"),
    (lambda j: j.update(apiVersion="kubeflow.org/v2"), "apiVersion: must be kubeflow.org/v1"),
    (lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 2}), "elasticPolicy.nProcPerNode"),
])
def test_each_webhook_rule_rejects_its_violation(edit, message):
    errors = _bad(edit)
    assert any(message in e for e in errors), errors


def test_generate_name_is_checked_for_the_suffix_room():
    def use_prefix(prefix):
        return lambda j: (j["metadata"].pop("name"), j["metadata"].update(generateName=prefix))

    assert _bad(use_prefix("pretrain-")) == []
    assert any("generateName" in e for e in _bad(use_prefix("p" * 59)))
    assert any("generateName" in e for e in _bad(use_prefix("-pretrain")))
    assert any("needs a name or a generateName" in e for e in _bad(lambda j: j["metadata"].pop("name")))


def test_elastic_policy_needs_a_worker():
    job = render_pytorchjob(JobSpec(name="solo", stage="pretrain"))
    job["spec"]["elasticPolicy"] = {"rdzvBackend": "c10d"}
    assert any("elasticPolicy: needs a Worker" in e for e in validate_pytorchjob(job))
