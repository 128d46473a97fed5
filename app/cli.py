"""`dinoctl`: the command line. Each package adds its own subcommands through `register()`.

Groups (DESIGN.md §1): pipeline run | submit | status | logs | rerun | cancel | curate | train |
distill | eval | export | register | models | data | storage | config | ui | render.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from app.errors import UserError

# Modules that define `register(subparsers)`. Listed explicitly so `dinoctl --help` is stable.
COMMAND_MODULES = (
    "app.config_commands",
    "app.data.commands",
    "app.storage.commands",
    "app.tracking.commands",
    "app.curation.commands",
    "app.train.commands",
    "app.train.distill_commands",
    "app.eval.commands",
    "app.launch.commands",
    "app.pipeline.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinoctl",
        description="DINOv2 curation, pretraining, distillation and evaluation as jobs, "
        "locally or on Kubernetes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is not there
            found = False
        if found:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    from app.config import ConfigError
    from app.storage import StorageError

    try:
        result = args.func(args)
    except (UserError, ConfigError, StorageError, FileNotFoundError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"dinoctl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
