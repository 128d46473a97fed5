"""`dinoctl config show <preset> [--set k=v ...]`."""

from __future__ import annotations

from app.config import dump_yaml, load_config


def add_config_args(parser, required: bool = True) -> None:
    """The common `--config` / `--set` pair every stage command takes."""
    parser.add_argument("--config", "-c", required=required, help="preset name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.batch_size_per_gpu=32")


def register(sub) -> None:
    p = sub.add_parser("config", help="show resolved configuration presets")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config of a preset")
    show.add_argument("preset", help="preset name (configs/<name>.yaml) or a YAML path")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=_show)


def _show(args) -> int:
    print(dump_yaml(load_config(args.preset, args.overrides)), end="")
    return 0
