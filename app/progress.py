"""Progress of a running stage, as one line anyone can read and a submitter can parse.

A stage logs `progress <stage> <done>/<total> <unit> key=value ... eta=<s>s` periodically
(`format_progress`); `dinoctl pipeline run` follows the running job's log, picks the newest such
line (`parse_progress`) and shows it as one updating line on a terminal, or as a line every
`every_s` seconds otherwise (`ProgressView`). Pure text in, text out: no imports from the rest
of app/, so every stage and every front end can use it.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

_LINE = re.compile(r"\bprogress (?P<stage>[\w.-]+) (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+)(?P<rest>.*)$")
_FIELD = re.compile(r"(?P<key>[\w/.-]+)=(?P<value>\S+)")


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_progress(stage: str, done: int, total: int, unit: str, elapsed_s: float,
                    start: int = 0, **fields: float | str) -> str:
    """The progress line; the ETA comes from the rate since `start` over `elapsed_s`."""
    rate = (done - start) / elapsed_s if elapsed_s > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    parts = [f"progress {stage} {done}/{total} {unit}"]
    for key, value in fields.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    parts.append(f"eta={eta:.0f}s" if math.isfinite(eta) else "eta=?")
    return " ".join(parts)


@dataclass(frozen=True)
class ProgressLine:
    stage: str
    done: int
    total: int
    unit: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def eta_s(self) -> float:
        text = self.fields.get("eta", "?").rstrip("s")
        try:
            return float(text)
        except ValueError:
            return float("nan")

    def text(self) -> str:
        """`pretrain  40/100 steps (40%)  loss=2.346  img/s=12.3  eta 1m25s`."""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        shown = "  ".join(f"{k}={v}" for k, v in self.fields.items() if k != "eta")
        return (f"{self.stage}  {self.done}/{self.total} {self.unit}{pct}"
                + (f"  {shown}" if shown else "") + f"  eta {format_eta(self.eta_s)}")


def parse_progress(line: str) -> ProgressLine | None:
    """The progress in a log line (anywhere in it: log prefixes are fine), or None."""
    m = _LINE.search(line.rstrip())
    if m is None:
        return None
    fields = {f["key"]: f["value"] for f in _FIELD.finditer(m["rest"])}
    return ProgressLine(m["stage"], int(m["done"]), int(m["total"]), m["unit"], fields)


class ProgressView:
    """Shows the newest progress: rewritten in place on a terminal, else a line every `every_s`
    seconds (and never the same line twice)."""

    def __init__(self, out: TextIO | None = None, every_s: float = 30.0, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.every_s = every_s
        self.clock = clock
        self._last_at = -math.inf
        self._last_text = ""
        self._width = 0

    def show(self, progress: ProgressLine) -> None:
        text = progress.text()
        if self.tty:
            self.out.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.out.flush()
            return
        now = self.clock()
        finished = progress.done >= progress.total
        if text != self._last_text and (now - self._last_at >= self.every_s or finished):
            self.out.write(text + "\n")
            self.out.flush()
            self._last_at, self._last_text = now, text

    def clear(self) -> None:
        """End the updating line (before the next regular output)."""
        if self.tty and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
            self._width = 0
