"""The process entry point inside every job: `torchrun -m app.entry <stage> [args...]`.

Stages register a `main(argv)` here; this file only dispatches, and makes sure the process
ends: a stage's error is one line and exit 1 (2 for a bad config), and the exit itself cannot
hang (no interpreter teardown that would join DataLoader workers or wait on a dead peer).
"""

from __future__ import annotations

import importlib
import sys

# stage -> module with `main(argv: list[str]) -> int`
STAGES = {
    "pretrain": "app.train.run",
    "train": "app.train.run",
    "distill": "app.train.distill",
    "curate": "app.curation.run",
    "eval": "app.eval.run",
    "register": "app.eval.registry_run",
    "synth": "app.data.synth",
    # one curation stage: `app.entry embed --config ...` is `app.entry curate embed --config ...`
    **{stage: "app.curation.run" for stage in ("embed", "dedup", "retrieve", "cluster",
                                               "materialize", "report")},
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m app.entry <{'|'.join(sorted(STAGES))}> [args...]", file=sys.stderr)
        return 2
    from app.config import ConfigError
    from app.errors import is_expected, one_line

    stage, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(STAGES[stage])
        return int(module.main([stage, *rest]) or 0)
    except ConfigError as exc:  # every stage: a bad config is one line and exit status 2
        print(f"{stage}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - any failure: one line, non-zero, now
        if not is_expected(exc):
            import traceback

            traceback.print_exc()
        print(f"{stage}: error: {one_line(exc)}", file=sys.stderr)
        return 1


EXIT_WATCHDOG_S = 30.0  # the most the clean-up below may take before the process just ends


def _exit(rc: int) -> None:
    """Leave a stage process without gloo's exit-time abort ("terminate called without an active
    exception", SIGABRT after all work is done): destroy any process group a stage left, flush,
    and skip interpreter teardown. A watchdog ends the process if the clean-up itself blocks."""
    import logging
    import os
    import threading

    watchdog = threading.Timer(EXIT_WATCHDOG_S, os._exit, (rc,))
    watchdog.daemon = True
    watchdog.start()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the stage's result stands; only the exit is at stake
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    _exit(main())
