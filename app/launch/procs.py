"""Process bookkeeping for the LocalExecutor, read from /proc: free ports, process groups,
descendants (torchrun puts its workers in sessions of their own) and killing all of them."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

POLL_S = 0.05
KILL_GRACE_S = 10.0


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option as torch's TCPStore server, so a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgrp, state) for every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def start_time(pid: int) -> int:
    """Kernel start time of `pid` (clock ticks since boot); 0 if it is gone. Guards pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return 0 if fields[0] in ("Z", "X") else int(fields[19])


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    return [pid for pid, (_, pgrp, state) in _proc_table().items()
            if pgrp == pgid and state not in ("Z", "X")]


def descendants(root: int) -> list[int]:
    """Live processes below `root` (torchrun starts its workers in sessions of their own, so a
    replica's process group alone does not cover them)."""
    children: dict[int, list[int]] = {}
    table = _proc_table()
    for pid, (ppid, _, state) in table.items():
        if state not in ("Z", "X"):
            children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def alive_processes(procs: list[list[int]]) -> list[int]:
    """The pids of `[[pid, start_time], ...]` that are still the same live process."""
    return [pid for pid, start in procs if start and start_time(pid) == start]


def kill_processes(pgids: list[int], procs: list[list[int]], grace: float = KILL_GRACE_S) -> None:
    """SIGTERM every group and every known process `[[pid, start_time], ...]`, wait up to `grace`
    seconds for all to exit, then SIGKILL what is left."""
    def remaining() -> bool:
        return bool(alive_processes(procs)) or any(group_pids(g) for g in pgids)

    def signal_all(sig: int) -> None:
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in alive_processes(procs):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_all(sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not remaining():
                return
            time.sleep(POLL_S)


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"
