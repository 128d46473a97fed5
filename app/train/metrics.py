"""Throughput, data-wait fraction, peak memory, and the progress display of a training run.

`StepTimer` measures each step's wall time and the part spent waiting for data; `Progress` shows
a tqdm bar with ETA on a TTY and one log line every `log_every` steps otherwise.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


class StepTimer:
    """Accumulates step time and data-wait time between `summary()` calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.images = 0
        self.step_time = 0.0
        self.data_time = 0.0

    def add(self, step_s: float, data_s: float, images: int) -> None:
        self.steps += 1
        self.images += images
        self.step_time += step_s
        self.data_time += data_s

    def summary(self) -> dict[str, float]:
        """images_per_s (global), step_time_s (mean), data_wait_fraction over the window."""
        total = self.step_time + self.data_time
        out = {
            "images_per_s": self.images / total if total > 0 else 0.0,
            "step_time_s": total / self.steps if self.steps else 0.0,
            "data_wait_fraction": self.data_time / total if total > 0 else 0.0,
        }
        self.reset()
        return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


class Progress:
    """tqdm on a TTY (rank 0 only), else a progress line (app/progress.py) every `log_every`
    steps, which `dinoctl pipeline run` shows live."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool, stage: str = "pretrain"):
        self.total, self.log_every, self.enabled, self.stage = total, max(log_every, 1), enabled, stage
        self.bar = None
        self.started = time.monotonic()
        self.start = start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: dict[str, Any]) -> None:
        """`step` is the index of the step just finished (0-based)."""
        if not self.enabled:
            return
        done = step + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values.get('total_loss', float('nan')):.4f}",
                                 lr=f"{values.get('lr', 0.0):.2e}")
            return
        if done % self.log_every == 0 or done == self.total:
            from app.progress import format_progress

            dino = values.get("dino_local_crops_loss", 0.0) + values.get("dino_global_crops_loss", 0.0)
            log.info("%s", format_progress(
                self.stage, done, self.total, "steps", time.monotonic() - self.started, self.start,
                loss=float(values.get("total_loss", float("nan"))), dino=float(dino),
                ibot=float(values.get("ibot_loss", 0.0)), koleo=float(values.get("koleo_loss", 0.0)),
                lr=float(values.get("lr", 0.0)), **{"img/s": float(values.get("images_per_s", 0.0))},
                data_wait=f"{100 * values.get('data_wait_fraction', 0.0):.0f}%"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
