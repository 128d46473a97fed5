"""The pipeline driver's pure parts: job names, per-stage overrides, configs read from storage."""

import pytest

from app import storage
from app.config import ConfigError, dump_yaml, load_config
from app.pipeline.runner import plan, stage_job_name, stage_overrides
from app.pipeline.stages import REGISTRY


def test_job_names_are_the_same_for_every_driver_and_stay_dns_labels():
    assert stage_job_name("demo", "pretrain", 1) == "demo-pretrain-1"
    assert stage_job_name("demo", "pretrain", 12) == "demo-pretrain-12"
    long = stage_job_name("A_Very_Long_Run_Name_" * 4, "distill", 3)
    assert len(long) <= 63 and long.endswith("-distill-3") and long == long.lower()
    assert stage_job_name("A_Very_Long_Run_Name_" * 4, "pretrain", 3) != long


def test_stage_overrides_reach_only_their_stage_and_bad_ones_are_one_line_errors():
    cfg = load_config("demo", ['pipeline.stage_overrides=["pretrain:launch.replicas=4", "eval:eval.knn_k=[10]"]'])
    assert stage_overrides(cfg, "pretrain") == ["launch.replicas=4"]
    assert stage_overrides(cfg, "eval") == ["eval.knn_k=[10]"]
    assert stage_overrides(cfg, "curate") == []
    with pytest.raises(ConfigError, match="<stage>:<key>=<value>"):
        load_config("demo", ['pipeline.stage_overrides=["launch.replicas=4"]'])
    stray = load_config("demo", ["pipeline.stages=[curate]", 'pipeline.stage_overrides=["pretrain:launch.replicas=2"]'])
    with pytest.raises(ConfigError, match="not in pipeline.stages"):
        plan(stray, REGISTRY, set())


def test_a_config_in_storage_loads_like_a_file(tmp_path):
    """A stage job's `--config` is the URI of its resolved config in the store."""
    cfg = load_config("demo", ["train.max_steps=7", f"run.store={tmp_path.as_uri()}"])
    uri = storage.join(tmp_path.as_uri(), "runs", "x", "pipeline", "pretrain.yaml")
    storage.put_bytes(uri, dump_yaml(cfg).encode())
    again = load_config(uri)
    assert again.train.max_steps == 7 and again == cfg
    storage.put_bytes(uri, b"_base_: demo\ntrain: {max_steps: 3}\n")  # a preset by name as its base
    assert load_config(uri).train.max_steps == 3 and load_config(uri).model.arch == cfg.model.arch
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(storage.join(tmp_path.as_uri(), "missing.yaml"))
