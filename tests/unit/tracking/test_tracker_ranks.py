"""Rank-0-only tracking, embedded store location and the standard tags."""

import pytest

from app.tracking import NullTracker, Tracker, embedded_store, get_tracker, global_rank, standard_tags
from app.tracking.commands import ui_command


def test_only_rank_zero_gets_a_real_tracker(monkeypatch, dinoctl_home):
    monkeypatch.setenv("RANK", "1")
    tracker = get_tracker()
    assert isinstance(tracker, NullTracker) and global_rank() == 1
    with tracker.start("pretrain", config={"a": 1}) as run:  # same methods, nothing happens
        run.log_params({"a": 1})
        run.log_metrics({"loss": 1.0}, step=1)
        run.log_summary({"x": 1}, "s.json")
        assert run.register_model("m", "model", alias="candidate") is None
    assert not (dinoctl_home / "mlflow.db").exists()
    monkeypatch.setenv("RANK", "0")
    assert isinstance(get_tracker(), Tracker)
    monkeypatch.setenv("DINOCTL_TRACKING", "off")  # a run without MLflow, on every rank
    assert isinstance(get_tracker(), NullTracker)


def test_embedded_store_follows_dinoctl_home_or_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path / "h"))
    assert embedded_store() == (f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}",
                                f"file://{tmp_path / 'h' / 'mlartifacts'}")
    monkeypatch.delenv("DINOCTL_HOME")
    monkeypatch.chdir(tmp_path)
    assert embedded_store()[0] == f"sqlite:///{tmp_path / '.dinoctl' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert Tracker().uri == "http://mlflow:5000"


def test_standard_tags_come_from_job_environment(monkeypatch):
    monkeypatch.setenv("DINOCTL_JOB_NAME", "pretrain-x")
    monkeypatch.setenv("DINOCTL_NAMESPACE", "ml")
    monkeypatch.setenv("DINOCTL_IMAGE", "img:1")
    monkeypatch.setenv("DINOCTL_GIT_REV", "abc123")
    from app.config import Config, config_hash

    cfg = Config()
    tags = standard_tags("eval", cfg)
    assert tags["stage"] == "eval" and tags["job_name"] == "pretrain-x"
    assert tags["namespace"] == "ml" and tags["image"] == "img:1" and tags["git_rev"] == "abc123"
    assert tags["config_hash"] == config_hash(cfg)
    cfg.train.batch_size_per_gpu += 1
    assert standard_tags("eval", cfg)["config_hash"] != tags["config_hash"]


def test_logging_outside_a_run_is_an_error(dinoctl_home):
    with pytest.raises(RuntimeError, match="no active run"):
        Tracker().log_metrics({"x": 1.0})


def test_ui_command_points_mlflow_at_embedded_store(dinoctl_home):
    cmd = ui_command("127.0.0.1", 5001)
    assert cmd[1:] == ["ui", "--backend-store-uri", f"sqlite:///{dinoctl_home / 'mlflow.db'}",
                       "--artifacts-destination", f"file://{dinoctl_home / 'mlartifacts'}",
                       "--host", "127.0.0.1", "--port", "5001", "--workers", "1"]
