"""A tiny real distributed job: gloo all_reduce steps with a checkpoint file it resumes from.

    torchrun -m tests.workloads.gloo_job <stage> --out DIR [--steps N] [--hold-at K] [--resume auto]

Every rank dumps its environment and its launcher's (torchrun's: the "pod" environment) to
`DIR/env-<rank>.json`. Each step all-reduces `rank + 1`; rank 0 checkpoints `{step, total}` to
`DIR/ckpt.json` after every step. With `--hold-at K` every rank writes `DIR/ready-<rank>` after
step K and waits for `DIR/release`, so a test can kill a replica at a known point without timing
guesses; a run that resumed at or past K does not hold. Rank 0 writes `DIR/result.json` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _launcher_env() -> dict[str, str]:
    raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hold-at", type=int, default=0)
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--exit-code", type=int, default=0, help="rank 0 exits with this code once")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    _write_json(out / f"env-{rank}.json", {"self": dict(os.environ), "launcher": _launcher_env()})

    ckpt = out / "ckpt.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() and args.resume != "never" else {}
    step, total = state.get("step", 0), state.get("total", 0.0)
    resumed_from = step
    print(f"rank {rank}/{world}: starting at step {step}", flush=True)
    if args.exit_code and rank == 0 and not (out / "exited").exists():
        (out / "exited").touch()
        sys.stdout.flush()
        os._exit(args.exit_code)

    while step < args.steps:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        step, total = step + 1, total + t.item()
        if rank == 0:
            _write_json(ckpt, {"step": step, "total": total})
        dist.barrier()  # the checkpoint of this step exists before anyone moves on
        print(f"rank {rank}: step {step} total {total}", flush=True)
        if step == args.hold_at and resumed_from < args.hold_at:
            (out / f"ready-{rank}").touch()
            while not (out / "release").exists():
                time.sleep(0.05)

    if rank == 0:
        _write_json(out / "result.json", {"steps": step, "total": total, "world_size": world,
                                          "resumed_from": resumed_from})
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # environment.md §2: avoid the gloo exit-time abort


if __name__ == "__main__":
    main(sys.argv[1:])
