"""The embedded pipeline: real stage jobs through the LocalExecutor, skipping finished stages."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from app import cli, storage
from app.config import load_config
from app.launch.local import LocalExecutor
from app.pipeline.runner import Pipeline, plan, summary_table
from app.pipeline.stages import Stage, _eval_inputs, store_uri, synth_uri
from app.progress import ProgressView

REPO = Path(__file__).resolve().parents[2]


def registry() -> dict[str, Stage]:
    """`probe` is a real (tiny) job; `publish` is a stage whose code does not exist yet, and
    `announce` needs it."""
    return {s.name: s for s in (
        Stage("probe", "eval", entry_module="tests.workloads.stage_job", inputs=_eval_inputs,
              marker=lambda c: store_uri(c, "runs", c.run.name, "probe", "_SUCCESS"),
              metrics=("knn_top1",)),
        Stage("publish", "register", requires=("app.pipeline.not_built_yet",),
              marker=lambda c: store_uri(c, "runs", c.run.name, "publish", "_SUCCESS")),
        Stage("announce", "register", needs=("publish",),
              marker=lambda c: store_uri(c, "runs", c.run.name, "announce", "_SUCCESS")),
    )}


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return load_config("demo", [f"run.store=file://{tmp_path / 'store'}", "run.name=pipe",
                                "pipeline.synth=true", "pipeline.synth_size=24",
                                "pipeline.stages=[probe,publish,announce]"])


@pytest.mark.slow
def test_pipeline_runs_available_stages_and_a_second_run_is_a_noop(tmp_path, cfg):
    ex = LocalExecutor(home=tmp_path / "home", workdir=REPO, detach=False)
    shown = io.StringIO()
    first = Pipeline(cfg, ex, registry=registry(), echo=lambda s: None,
                     progress=ProgressView(shown, every_s=3600, tty=False)).run()
    by_name = {r.name: r for r in first}
    # the running stage's progress, read from its log: here (no terminal) the finished line
    # (an earlier one is shown only when every_s has passed since the last)
    assert "eval  3/3 steps (100%)  loss=0.3333  eta 0s" in shown.getvalue().splitlines()
    assert by_name["synth"].status == "ran"
    assert storage.exists(storage.join(synth_uri(cfg), "eval_val", "_stats.json"))
    assert by_name["probe"].status == "ran", by_name["probe"].detail
    assert by_name["probe"].metric == "knn_top1=0.75"
    assert by_name["publish"].status == "not available"
    assert "app.pipeline.not_built_yet" in by_name["publish"].detail
    assert by_name["announce"].status == "blocked" and "publish" in by_name["announce"].detail

    # The stage read the synthetic data set's URIs from its resolved config file.
    summary = storage.get_json(store_uri(cfg, "runs", "pipe", "probe", "_SUCCESS"))
    assert summary["eval_val"] == storage.join(synth_uri(cfg), "eval_val")
    assert summary["eval_train"] == storage.join(synth_uri(cfg), "eval_train")
    assert storage.exists(store_uri(cfg, "runs", "pipe", "pipeline", "probe.yaml"))

    # One parent run for the pipeline; the stage's own run is its child.
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    child = client.get_run(summary["run_id"])
    assert summary["parent_run_id"] and child.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["stage.probe"] == "ran"

    jobs_before = sorted((tmp_path / "home" / "jobs").iterdir())
    second = Pipeline(cfg, ex, registry=registry(), echo=lambda s: None).run()
    assert [(r.name, r.status) for r in second] == [
        ("probe", "cached"), ("publish", "not available"), ("announce", "blocked")]
    assert second[0].metric == "knn_top1=0.75"
    assert sorted((tmp_path / "home" / "jobs").iterdir()) == jobs_before  # no job was started
    assert "cached" in summary_table(second)

    assert [r.status for r in plan(cfg, registry(), {"probe"})][0] == "planned"


def test_unknown_pipeline_stage_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path / "home"))
    rc = cli.main(["pipeline", "run", "--config", "demo", "--set", "pipeline.stages=[curate,bogus]",
                   "--set", f"run.store=file://{tmp_path}/store"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pipeline.stages" in err and "bogus" in err
