"""`torchrun` with container exit codes: torch's launcher, unchanged, except how it ends.

torch's `torchrun` turns every ending but success into exit 1: a SIGTERM to the agent (a pod being
deleted or a node drained) and workers that stopped with 143 after checkpointing alike. A
PyTorchJob with `restartPolicy: ExitCode` then takes a preemption for a permanent failure. This
wrapper runs `torch.distributed.run.main` and ends the way a container runtime should see it:

    agent got signal S (after its workers were stopped)   -> dies by S itself: exit 128 + S (143)
    every failed worker exited 143 (preempted, checkpointed) -> 143
    anything else                                           -> what torch does (1)

and, unless set, gives workers `$DINOCTL_SIGTERM_GRACE_S` + 5 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
to checkpoint before torch's agent sends SIGKILL (its default is 30 s).

In our images `torchrun` on PATH is this wrapper (`python -m app.launch.torchrun --install DIR`
writes it), so the pods' `torchrun -m app.entry <stage> ...` is unchanged; `dinoctl-torchrun` is
the same program for any other installation.
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPTED = 143
SHIM = """#!{python}
# dinoctl's torchrun: torch's launcher with container exit codes (app/launch/torchrun.py).
import sys
from app.launch.torchrun import main
sys.exit(main())
"""


def _shutdown_timeout() -> None:
    if os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or os.environ.get("PET_SHUTDOWN_TIMEOUT"):
        return
    grace = os.environ.get("DINOCTL_SIGTERM_GRACE_S", "").strip()
    try:
        seconds = float(grace) if grace else 0.0
    except ValueError:
        seconds = 0.0
    if seconds > 0:
        os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(int(seconds) + 5)


def _die_by(sig: int) -> None:
    """End this process by signal `sig` (exit status 128 + sig), as if torch had not caught it.
    As PID 1 of a container a default-action signal to itself is ignored: then exit 128 + sig."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def exit_code_for_failures(codes: list[int]) -> int:
    """The wrapper's exit code when workers failed with `codes` (torch's per-worker exit codes;
    negative for a signal)."""
    return PREEMPTED if codes and all(code == PREEMPTED for code in codes) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--install"]:
        return install(argv[1] if len(argv) > 1 else os.path.dirname(sys.executable))
    _shutdown_timeout()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torch_main

    try:
        torch_main(argv)
    except SignalException as exc:
        print(f"torchrun: {exc}; workers stopped", file=sys.stderr)
        _die_by(int(exc.sigval))
    except ChildFailedError as exc:
        print(str(exc), file=sys.stderr)
        return exit_code_for_failures([f.exitcode for f in exc.failures.values()])
    return 0


def install(bin_dir: str) -> int:
    """Write `torchrun` (this wrapper) into `bin_dir`, replacing torch's console script."""
    path = os.path.join(bin_dir, "torchrun")
    tmp = f"{path}.dinoctl-tmp"
    with open(tmp, "w") as f:
        f.write(SHIM.format(python=sys.executable))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    print(f"installed {path} -> app.launch.torchrun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
