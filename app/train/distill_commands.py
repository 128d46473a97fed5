"""`dinoctl distill --config <preset> [--set k=v ...] [--nproc N] [--resume auto|never|URI]`

Distil a frozen teacher run into a smaller student, locally: one process runs here; N > 1 starts
`torchrun --nproc_per_node N -m app.entry distill ...` on this machine (the command a PyTorchJob
pod runs). Clusters go through `dinoctl pipeline` / the launch package instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a pretrained teacher run into a smaller student "
                                       "(DeepSpeed, torchrun); exports the student's EMA")
    p.add_argument("--config", required=True, help="preset name (configs/) or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--teacher", default=None, help="teacher run URI (shorthand for --set distill.teacher=...)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--resume", default=None, help="auto | never | checkpoint URI")
    p.set_defaults(func=_distill)


def overrides(args: argparse.Namespace) -> list[str]:
    return list(args.set) + ([f"distill.teacher={args.teacher}"] if args.teacher else [])


def stage_argv(args: argparse.Namespace) -> list[str]:
    """`distill --config ... --set ...` as `app.entry` receives it."""
    argv = ["distill", "--config", args.config]
    for item in overrides(args):
        argv += ["--set", item]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv


def torchrun_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "app.launch.torchrun", "--standalone", "--nproc_per_node",
            str(args.nproc), "-m", "app.entry", *stage_argv(args)]


def _distill(args: argparse.Namespace) -> int:
    from app.errors import UserError
    from app.config import load_config
    from app.train.distill import DistillSetupError, prepare_config

    try:
        prepare_config(load_config(args.config, overrides(args)))  # fail fast, one line
    except DistillSetupError as exc:
        raise UserError(str(exc)) from None
    if args.nproc < 1:
        raise UserError("--nproc must be >= 1")
    if args.nproc == 1:
        from app.train.distill import main

        return main(stage_argv(args))
    return subprocess.call(torchrun_command(args))
