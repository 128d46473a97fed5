"""A pipeline driver for tests: the real `Pipeline` over the Kubernetes API (KUBECONFIG: kmock),
with the test stages of `stages()`.

    python -m tests.workloads.pipeline_driver --namespace ml --set k=v ...

Stages: `first` (a tiny real job), then `probe`, which needs it and holds while $HOLD_FILE is
missing and fails while $FIX_FILE is missing (either unset: no hold / no failure). Prints the
summary table; exit 1 if a stage failed, 2 if the lease is held by another driver.
"""

from __future__ import annotations

import argparse
import os
import sys


def stages() -> dict:
    from app.pipeline.stages import Stage, _eval_inputs, store_uri

    extra: list[str] = []
    if os.environ.get("HOLD_FILE"):
        extra += ["--hold-until", os.environ["HOLD_FILE"]]
    if os.environ.get("FIX_FILE"):
        extra += ["--fail-unless", os.environ["FIX_FILE"]]
    return {s.name: s for s in (
        Stage("first", "eval", entry_module="tests.workloads.stage_job", inputs=_eval_inputs,
              entry_args=("--marker-dir", "first"),
              marker=lambda c: store_uri(c, "runs", c.run.name, "first", "_SUCCESS"), metrics=("knn_top1",)),
        Stage("probe", "eval", entry_module="tests.workloads.stage_job", needs=("first",),
              entry_args=tuple(extra), inputs=_eval_inputs,
              marker=lambda c: store_uri(c, "runs", c.run.name, "probe", "_SUCCESS"), metrics=("knn_top1",)),
    )}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--namespace", default="ml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    from app.config import load_config
    from app.launch.kubernetes import KubernetesExecutor
    from app.pipeline.runner import Pipeline, PipelineBusy, summary_table

    cfg = load_config("demo", ["pipeline.stages=[first,probe]", *args.overrides])
    try:
        results = Pipeline(cfg, KubernetesExecutor(namespace=args.namespace, poll_interval=0.1),
                           registry=stages()).run()
    except PipelineBusy as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(summary_table(results), flush=True)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
