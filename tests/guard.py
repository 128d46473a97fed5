"""The suite leaves the user's state alone: the checkout's `.dinoctl/` (embedded store, local
jobs) and `mlruns/` (MLflow's own default) are fingerprinted when the suite starts and compared
when it ends; the suite gets a home of its own in a temporary directory meanwhile."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

USER_STATE = (".dinoctl", "mlruns")


def fingerprint(root: Path) -> dict[str, tuple[int, int]]:
    """`{relative path: (size, mtime_ns)}` of every file and directory under root's user state."""
    out: dict[str, tuple[int, int]] = {}
    for name in USER_STATE:
        top = root / name
        if not top.exists():
            continue
        for path in [top, *top.rglob("*")]:
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


def describe_change(before: dict, after: dict) -> str | None:
    """One line naming what appeared, disappeared or changed, or None when nothing did."""
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    parts = [f"{label} {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}"
             for label, paths in (("created", added), ("removed", removed), ("changed", changed)) if paths]
    return "; ".join(parts) or None


class UserStateGuard:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.before = fingerprint(self.root)
        self.session_home = Path(tempfile.mkdtemp(prefix="dinoctl-tests-home-"))

    def finish(self) -> str | None:
        problem = describe_change(self.before, fingerprint(self.root))
        if os.environ.get("DINOCTL_TESTS_KEEP_HOME") is None:
            shutil.rmtree(self.session_home, ignore_errors=True)
        return problem
