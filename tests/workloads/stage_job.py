"""A tiny stage for pipeline tests: reads its resolved config, logs a child MLflow run, writes
its output marker (a summary JSON) to `<store>/runs/<run.name>/<stage>/_SUCCESS`.

    torchrun -m tests.workloads.stage_job <stage> [--hold-until FILE] [--fail-unless FILE] --config <uri>

`--hold-until FILE`: after starting (it prints `holding`), wait until FILE exists, so a test can
act while the stage job is known to run. `--fail-unless FILE`: exit 1 with a one-line error
unless FILE exists (a stage that fails until its cause is fixed).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage")
    parser.add_argument("--config", required=True)
    parser.add_argument("--marker-dir", default="probe")
    parser.add_argument("--hold-until", default="")
    parser.add_argument("--fail-unless", default="")
    args = parser.parse_args(argv)
    if args.fail_unless and not os.path.exists(args.fail_unless):
        print(f"{args.stage}: error: {args.fail_unless} is missing", file=sys.stderr, flush=True)
        os._exit(1)
    if args.hold_until:
        import time

        print("holding", file=sys.stderr, flush=True)
        while not os.path.exists(args.hold_until):
            time.sleep(0.1)

    from app import storage
    from app.config import load_config
    from app.tracking import get_tracker

    cfg = load_config(args.config)
    summary = {"knn_top1": 0.75, "eval_train": cfg.eval.train, "eval_val": cfg.eval.val,
               "parent_run_id": os.environ.get("DINOCTL_PARENT_RUN_ID", "")}
    from app.progress import format_progress

    for done in (1, 2, 3):  # what a real stage logs while it works
        print(format_progress(args.stage, done, 3, "steps", elapsed_s=done * 0.5, loss=1.0 / done),
              file=sys.stderr, flush=True)
    with get_tracker().start(args.stage, config=cfg) as run:
        run.log_metrics({"knn_top1": summary["knn_top1"]})
        summary["run_id"] = run.run_id
    uri = storage.join(storage.to_uri(cfg.run.store), "runs", cfg.run.name, args.marker_dir, "_SUCCESS")
    storage.put_json(uri, summary)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
