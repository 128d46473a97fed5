"""`dinoctl pipeline run --config <preset> [--set k=v] [--backend local] [--force STAGE]`."""

from __future__ import annotations

import time


def register(sub) -> None:
    from app.config_commands import add_config_args

    p = sub.add_parser("pipeline", help="the embedded pipeline: curate -> pretrain -> distill -> eval -> register")
    psub = p.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    run = psub.add_parser("run", help="run the stages of config.pipeline.stages, skipping finished ones")
    add_config_args(run)
    run.add_argument("--backend", choices=("local",), default="local",
                     help="where stage jobs run (the pipeline runs stages locally)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun this stage (and what follows it) even if its outputs exist; 'all' for every stage")
    run.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from app.config import load_config
    from app.launch.commands import get_executor
    from app.pipeline.runner import Pipeline, summary_table

    cfg = load_config(args.config, args.overrides)
    executor = get_executor(args.backend)
    started = time.monotonic()
    results = Pipeline(cfg, executor, home=executor.store.home).run(force=set(args.force))
    print(summary_table(results))
    print(f"pipeline {cfg.run.name}: {time.monotonic() - started:.1f} s; "
          "see the runs with: dinoctl ui")
    return 1 if any(r.status == "failed" for r in results) else 0
