"""The process entry point inside every job: `torchrun -m app.entry <stage> [args...]`.

Stages register a `main(argv)` here; this file only dispatches.
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
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m app.entry <{'|'.join(sorted(STAGES))}> [args...]", file=sys.stderr)
        return 2
    from app.config import ConfigError

    stage, rest = argv[0], argv[1:]
    module = importlib.import_module(STAGES[stage])
    try:
        return int(module.main([stage, *rest]) or 0)
    except ConfigError as exc:  # every stage: a bad config is one line and exit status 2
        print(f"{stage}: error: {exc}", file=sys.stderr)
        return 2


def _exit(rc: int) -> None:
    """Leave a stage process without gloo's exit-time abort ("terminate called without an active
    exception", SIGABRT after all work is done): destroy any process group a stage left, flush,
    and skip interpreter teardown."""
    import logging
    import os

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
