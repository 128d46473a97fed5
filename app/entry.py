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


if __name__ == "__main__":
    sys.exit(main())
