"""Per-iteration schedules of DINOv2: lr, weight decay, teacher momentum, teacher temperature and
last-layer lr, all precomputed as numpy arrays indexed by the global step.

"Epochs" are `train.epoch_length` iterations (1250 officially), whatever the data set size.
When `train.max_steps > 0` the whole recipe is compressed into `max_steps` iterations: every
epoch-based length (warm-up, teacher-temperature warm-up, last-layer freeze) is scaled by
`max_steps / (epochs * epoch_length)`, so a short run still sees the full schedule shapes
(warm-up, cosine decay to the final values). Steps past the end return the final values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.config import Config, scaled_lr


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """[total_iters] float64: `freeze_iters` zeros, then a linear warm-up from
    `start_warmup_value` to `base_value` (both ends included) over `warmup_iters`, then a
    half-cosine from `base_value` down (or up) to `final_value` over the remaining iterations.
    """
    if total_iters < 0 or warmup_iters < 0 or freeze_iters < 0:
        raise ValueError("schedule lengths must be >= 0")
    if freeze_iters + warmup_iters > total_iters:
        raise ValueError(
            f"freeze_iters ({freeze_iters}) + warmup_iters ({warmup_iters}) exceed total_iters ({total_iters})"
        )
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n_cosine = total_iters - warmup_iters - freeze_iters
    t = np.arange(n_cosine)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * t / max(n_cosine, 1)))
    return np.concatenate([freeze, warmup, cosine]).astype(np.float64)


def teacher_temperature_schedule(
    warmup_temp: float, temp: float, warmup_iters: int, total_iters: int
) -> np.ndarray:
    """[total_iters]: linear `warmup_temp` -> `temp` over `warmup_iters` (both ends included),
    then constant `temp`. A warm-up longer than the run is cut at `total_iters`."""
    warmup = np.linspace(warmup_temp, temp, warmup_iters)[:total_iters]
    rest = np.full(max(total_iters - warmup_iters, 0), temp, dtype=np.float64)
    return np.concatenate([warmup, rest]).astype(np.float64)


def value_at(schedule: np.ndarray, step: int) -> float:
    """schedule[step], or its last value for steps past the end (and 0.0 for an empty one)."""
    if len(schedule) == 0:
        return 0.0
    return float(schedule[min(step, len(schedule) - 1)])


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float


@dataclass
class Schedules:
    """All per-iteration schedules of one run; `at(step)` gives the values for that step."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray
    total_iters: int

    def at(self, step: int) -> ScheduleValues:
        return ScheduleValues(
            lr=value_at(self.lr, step),
            wd=value_at(self.wd, step),
            momentum=value_at(self.momentum, step),
            teacher_temp=value_at(self.teacher_temp, step),
            last_layer_lr=value_at(self.last_layer_lr, step),
        )

    @classmethod
    def from_config(cls, cfg: Config, world_size: int = 1) -> "Schedules":
        """Build from `optim`, `teacher` and `train` (epochs, epoch_length, max_steps); the peak
        lr is `scaled_lr(cfg, world_size)` (batch-size scaling rule)."""
        o, te, tr = cfg.optim, cfg.teacher, cfg.train
        full = o.epochs * tr.epoch_length
        if full <= 0 and tr.max_steps <= 0:
            raise ValueError("schedules: optim.epochs * train.epoch_length must be > 0 (or set train.max_steps)")
        total = tr.max_steps if tr.max_steps > 0 else full
        # Iterations per recipe epoch after compression (== epoch_length without max_steps).
        per_epoch = total / o.epochs if o.epochs > 0 else float(tr.epoch_length)

        def iters(epochs: float) -> int:
            return min(int(round(epochs * per_epoch)), total)

        peak_lr = scaled_lr(cfg, world_size)
        warmup = iters(o.warmup_epochs)
        lr = cosine_schedule(peak_lr, o.min_lr, total, warmup_iters=warmup)
        last_layer_lr = lr.copy()
        # The prototype layer is frozen (lr 0) for the first epoch(s); the schedule is not shifted.
        last_layer_lr[: iters(o.freeze_last_layer_epochs)] = 0.0
        return cls(
            lr=lr,
            wd=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
            momentum=cosine_schedule(te.momentum_teacher, te.final_momentum_teacher, total),
            teacher_temp=teacher_temperature_schedule(
                te.warmup_teacher_temp, te.teacher_temp, iters(te.warmup_teacher_temp_epochs), total
            ),
            last_layer_lr=last_layer_lr,
            total_iters=total,
        )
