"""app.tracking against a real MLflow server (artifacts in S3) and the embedded sqlite default."""

from __future__ import annotations

import json
import uuid

import pytest

from app import storage
from app.tracking import Tracker, get_version_by_alias, set_alias

pytestmark = pytest.mark.slow


def _log_everything(tracker: Tracker, tmp_path, model_name: str):
    weights = tmp_path / "model" / "backbone.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"\x00weights" * 100)
    with tracker.start("pipeline", run_name="pipe", config={"run": {"name": "t"}}) as parent:
        parent_id = parent.run_id
    with tracker.start("pretrain", config={"optim": {"base_lr": 0.004}, "s3": {"secret_key": "hunter2"},
                                           "curation": {"dedup": {"k": 64}}},
                       parent_run_id=parent_id) as run:
        run.log_params({f"p{i:03d}": i for i in range(150)})  # more than one batch of 100
        for step in range(3):
            run.log_metrics({"loss/dino": 1.0 / (step + 1), "lr": 1e-3}, step=step)
        run.log_artifact(str(weights.parent), "model")
        run.log_summary({"knn": {"top1": 0.5, "k": [10, 20]}, "n_images": 12}, "eval/summary.json")
        version = run.register_model(model_name, "model", alias="candidate")
        child_id = run.run_id
    return parent_id, child_id, version


def _check_run(tracker: Tracker, parent_id: str, child_id: str, version: str, model_name: str):
    client = tracker.client
    child = client.get_run(child_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["stage"] == "pretrain" and len(child.data.tags["config_hash"]) == 12
    params = child.data.params
    assert params["optim.base_lr"] == "0.004" and params["curation.dedup.k"] == "64"
    assert "s3.secret_key" not in params and "hunter2" not in json.dumps(params)
    assert params["p149"] == "149"
    history = client.get_metric_history(child_id, "loss/dino")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert child.data.metrics["knn.top1"] == 0.5 and child.data.metrics["n_images"] == 12
    artifacts = {a.path for a in client.list_artifacts(child_id)}
    assert {"model", "eval", "config.json"} <= artifacts
    local = client.download_artifacts(child_id, "eval/summary.json")
    assert json.load(open(local))["knn"]["top1"] == 0.5
    mv = get_version_by_alias(model_name, "candidate", uri=tracker.uri)
    assert str(mv.version) == version and mv.run_id == child_id
    set_alias(model_name, "champion", version, uri=tracker.uri)
    assert str(tracker.get_version_by_alias(model_name, "champion").version) == version
    # MLflow opens the experiment on its model-training view (its GenAI one without this tag)
    experiment = client.get_experiment(child.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_params_metrics_artifacts_and_model_on_server(mlflow_server, s3_env, tmp_path):
    tracker = Tracker(uri=mlflow_server.uri, experiment=f"exp-{uuid.uuid4().hex[:6]}")
    name = f"dinov2-test-{uuid.uuid4().hex[:6]}"
    parent_id, child_id, version = _log_everything(tracker, tmp_path, name)
    _check_run(tracker, parent_id, child_id, version, name)
    # The server proxied the artifacts into the S3 bucket.
    keys = [o.uri for o in storage.list_objects(mlflow_server.artifacts_uri)]
    mine = [k for k in keys if f"/{child_id}/" in k]
    assert any(k.endswith("model/backbone.pth") for k in mine)
    assert any(k.endswith("eval/summary.json") for k in mine)


def test_embedded_default_store_under_dinoctl_home(dinoctl_home, tmp_path):
    tracker = Tracker()
    assert tracker.uri == f"sqlite:///{dinoctl_home / 'mlflow.db'}"
    parent_id, child_id, version = _log_everything(tracker, tmp_path, "dinov2-embedded")
    _check_run(tracker, parent_id, child_id, version, "dinov2-embedded")
    assert (dinoctl_home / "mlflow.db").is_file()
    stored = [p for p in (dinoctl_home / "mlartifacts").rglob("backbone.pth") if child_id in str(p)]
    assert len(stored) == 1


def test_failed_stage_marks_run_failed_and_parent_comes_from_env(embedded_mlflow, monkeypatch):
    tracker = Tracker()
    with tracker.start("pipeline") as parent:
        parent_id = parent.run_id
    monkeypatch.setenv("DINOCTL_PARENT_RUN_ID", parent_id)
    monkeypatch.setenv("DINOCTL_JOB_NAME", "pretrain-abc")
    with pytest.raises(ValueError):
        with tracker.start("eval") as run:
            child_id = run.run_id
            raise ValueError("boom")
    child = tracker.client.get_run(child_id)
    assert child.info.status == "FAILED"
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["job_name"] == "pretrain-abc"


def test_an_experiment_made_without_a_kind_gets_the_model_training_kind(mlflow_server):
    from mlflow.tracking import MlflowClient

    name = f"exp-{uuid.uuid4().hex[:6]}"
    exp_id = MlflowClient(tracking_uri=mlflow_server.uri).create_experiment(name)  # as before
    tracker = Tracker(uri=mlflow_server.uri, experiment=name)
    with tracker.start("eval"):
        pass
    tags = tracker.client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
