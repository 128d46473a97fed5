"""Every stage a job can name (`dinoctl submit <stage>`, the chart) is one `app.entry` runs."""

import importlib

import pytest

from app.entry import STAGES, main
from app.launch.jobspec import STAGES as JOB_STAGES


def test_every_job_stage_has_an_entry_that_parses_a_config_argument():
    assert set(JOB_STAGES) == set(STAGES)
    for stage, module in STAGES.items():
        args = importlib.import_module(module).parse_args([stage, "--config", "demo"])
        assert args.config == "demo", stage


@pytest.mark.parametrize("argv, stage", [(["curate", "--config", "demo"], "run"),
                                         (["curate", "dedup", "--config", "demo"], "dedup"),
                                         (["embed", "--config", "demo"], "embed")])
def test_curation_entry_runs_every_stage_unless_one_is_named(argv, stage):
    from app.curation.run import parse_args

    assert parse_args(argv).stage == stage


def test_an_unknown_stage_is_a_usage_error(capsys):
    assert main(["knn", "--config", "demo"]) == 2
    assert "usage" in capsys.readouterr().err
