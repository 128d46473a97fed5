"""`dinoctl train --config <preset> [--set k=v ...] [--nproc N] [--resume auto|never|URI]`

A local convenience: one process runs in this process; N > 1 starts
`torchrun --nproc_per_node N -m app.entry pretrain ...` on this machine (the same command a
PyTorchJob pod runs). Clusters go through `dinoctl pipeline` / the launch package instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def register(sub) -> None:
    p = sub.add_parser("train", help="pretrain a DINOv2 model locally (DeepSpeed, torchrun)")
    p.add_argument("--config", required=True, help="preset name (configs/) or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--resume", default=None, help="auto | never | checkpoint URI")
    p.set_defaults(func=_train)


def torchrun_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "app.launch.torchrun", "--standalone",
           "--nproc_per_node", str(args.nproc), "-m", "app.entry", "pretrain", "--config", args.config]
    for item in args.set:
        cmd += ["--set", item]
    if args.resume:
        cmd += ["--resume", args.resume]
    return cmd


def _train(args: argparse.Namespace) -> int:
    from app.config import load_config

    load_config(args.config, args.set)  # fail fast, with the one-line config error
    if args.nproc < 1:
        raise ValueError("--nproc must be >= 1")
    if args.nproc == 1:
        from app.train.run import main

        argv = ["pretrain", "--config", args.config]
        for item in args.set:
            argv += ["--set", item]
        if args.resume:
            argv += ["--resume", args.resume]
        return main(argv)
    return subprocess.call(torchrun_command(args))
