"""`dinoctl pipeline run|status --config <preset> [--set k=v] [--backend local|k8s]`.

    dinoctl pipeline run --config demo                                   # embedded: local jobs
    dinoctl pipeline run --backend k8s --namespace ml --config demo --set run.store=s3://dinoctl/store
    dinoctl pipeline status --config demo [--backend k8s --namespace ml]
"""

from __future__ import annotations

import time


def _backend_args(p) -> None:
    p.add_argument("--backend", choices=("local", "k8s"), default="local",
                   help="where the stage jobs run: local processes, or PyTorchJobs in a cluster")
    p.add_argument("--namespace", default=None,
                   help="--backend k8s: the namespace of the jobs (default: the config's launch.namespace)")


def register(sub) -> None:
    from app.config_commands import add_config_args

    p = sub.add_parser("pipeline", help="the pipeline: curate -> pretrain -> distill -> eval -> register")
    psub = p.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    run = psub.add_parser("run", help="run the stages of config.pipeline.stages, skipping finished ones "
                          "and adopting a stage job an earlier driver left running")
    add_config_args(run)
    _backend_args(run)
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun this stage (and what follows it) even if its outputs exist; 'all' for every stage")
    run.set_defaults(func=_cmd_run)
    st = psub.add_parser("status", help="each stage of a pipeline run: status, job, phase, restarts, key metric")
    st.add_argument("run_name", nargs="?", metavar="RUN", help="the pipeline run (default: the config's run.name)")
    add_config_args(st)
    _backend_args(st)
    st.set_defaults(func=_cmd_status)


def _setup(args):
    from app.config import load_config
    from app.launch.commands import get_executor

    overrides = list(args.overrides) + ([f"run.name={args.run_name}"] if getattr(args, "run_name", None) else [])
    cfg = load_config(args.config, overrides)
    namespace = args.namespace or (cfg.launch.namespace if args.backend == "k8s" else None)
    return cfg, get_executor(args.backend, namespace)


def _cmd_run(args) -> int:
    from app.errors import UserError
    from app.pipeline.runner import Pipeline, PipelineBusy, summary_table

    cfg, executor = _setup(args)
    started = time.monotonic()
    try:
        results = Pipeline(cfg, executor).run(force=set(args.force))
    except PipelineBusy as exc:
        raise UserError(str(exc)) from None
    print(summary_table(results))
    print(f"pipeline {cfg.run.name}: {time.monotonic() - started:.1f} s; "
          "see the runs with: dinoctl ui")
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_status(args) -> int:
    from app.pipeline.runner import status_rows, status_table

    cfg, executor = _setup(args)
    print(status_table(status_rows(cfg, executor)))
    return 0
