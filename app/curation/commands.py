"""`dinoctl curate <stage> | run | report`: the curation stages from the command line."""

from __future__ import annotations

import argparse
import json

from app.curation.run import STAGES


def register(sub) -> None:
    p = sub.add_parser("curate", help="curation: embed, dedup, retrieve, cluster, materialize, report")
    csub = p.add_subparsers(dest="curate_command", metavar="STAGE", required=True)
    for stage in (*STAGES, "run"):
        if stage == "report":
            continue
        s = csub.add_parser(stage, help=f"run the {stage} stage" if stage != "run" else
                            "run every configured stage, then the report")
        _common(s)
        s.set_defaults(func=_run, stage=stage)
    r = csub.add_parser("report", help="print (and build if needed) a run's curation report")
    r.add_argument("run", nargs="?", default="", help="run name (default: run.name from the config)")
    _common(r)
    r.set_defaults(func=_report, stage="report")


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", default="curate_lvd", help="preset name or YAML path")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--force", action="store_true", help="recompute even if the stage is done")


def _load(args):
    from app.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "run", ""):
        overrides.append(f"run.name={args.run}")
    return load_config(args.config, overrides)


def _run(args) -> int:
    from app.curation.run import curate

    results = curate(args.stage, _load(args), force=args.force)
    for stage, summary in results.items():
        if summary:
            short = {k: v for k, v in summary.items() if not k.startswith("leaf_sizes")}
            print(f"{stage}: {json.dumps(short, default=str)[:400]}")
    return 0


def _report(args) -> int:
    from app.curation.artifacts import CurationRun
    from app.curation.report import format_table
    from app.errors import UserError

    cfg = _load(args)
    run = CurationRun(cfg.run.store, cfg.run.name)
    if not run.done("report") or args.force:
        if not (run.done("embeddings")):
            raise UserError(f"no curation run at {run.root} (run `dinoctl curate run` first)")
        from app.curation.run import curate

        curate("report", cfg, force=True)
    summary = run.summary("report")
    print(f"curation run {run.root}")
    print(format_table(summary["counts"]))
    print("figures: " + ", ".join(run.uri("report", f) for f in summary["figures"]))
    return 0
