"""One training step as a function of (batch, step).

    losses = train_step(parts, batch, step)

Sets the scheduled lr / weight decay, runs teacher and student, checks every loss term is
finite on every rank *before* backward (so a NaN never reaches the weights or a checkpoint),
lets the engine do backward, clips the gradients (each module on its own, `app/train/clipping.py`,
or DeepSpeed's one global norm), lets the engine step, then moves the EMA teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from app.ssl.meta_arch import SSLMetaArch
from app.ssl.param_groups import apply_schedules
from app.ssl.schedules import Schedules
from app.train.engine import optimizer_param_groups


class NonFiniteLoss(RuntimeError):
    """A loss term (before backward) or a gradient norm (before the optimizer step) became NaN or
    inf: raised before any weight changed."""


@dataclass
class TrainParts:
    engine: Any  # the DeepSpeed engine wrapping the student SSLNetwork
    meta: SSLMetaArch  # EMA teacher + centers + losses
    schedules: Schedules
    zero_stage: int
    compute_dtype: torch.dtype  # bf16 on GPU, fp32 on CPU
    clipper: Any = None  # app.train.clipping.ModuleClipper (per-module clipping), or None


def train_step(parts: TrainParts, batch: dict, step: int) -> dict[str, float]:
    """Run step `step` on `batch` (already on the device); return the rank-averaged loss terms
    and the schedule values used."""
    s = parts.schedules.at(step)
    apply_schedules(optimizer_param_groups(parts.engine), s.lr, s.wd, s.last_layer_lr)
    teacher_out = parts.meta.get_teacher_output(batch, s.teacher_temp, parts.compute_dtype)
    student_out = parts.meta.get_student_output(parts.engine, batch, parts.compute_dtype)
    losses = parts.meta.compute_losses(student_out, teacher_out, batch)
    values = reduce_losses(losses)
    check_finite(values, step)
    parts.engine.backward(losses["total_loss"])
    if parts.clipper is not None:
        norms = parts.clipper.clip()
        check_finite_gradients(norms, step)
        values.update({f"grad_norm_{name}": norm for name, norm in norms.items()})
    parts.engine.step()
    parts.meta.update_teacher(parts.engine.module, s.momentum, zero3=parts.zero_stage == 3)
    values.update(lr=s.lr, wd=s.wd, momentum=s.momentum, teacher_temp=s.teacher_temp,
                  last_layer_lr=s.last_layer_lr)
    return values


def reduce_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each term over ranks (one all-reduce); every rank gets the same numbers, so all
    ranks agree on whether to stop."""
    names = sorted(losses)
    vec = torch.stack([losses[n].detach().float() for n in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return dict(zip(names, vec.cpu().tolist()))


def check_finite_gradients(norms: dict[str, float], step: int) -> None:
    """Every rank sees the same (all-reduced) norms, so all ranks stop together."""
    _stop_if_not_finite(norms, step, "gradient norm")


def check_finite(values: dict[str, float], step: int) -> None:
    _stop_if_not_finite(values, step, "loss")


def _stop_if_not_finite(values: dict[str, float], step: int, what: str) -> None:
    bad = [n for n, v in values.items() if not math.isfinite(v)]
    if bad:
        detail = ", ".join(f"{n}={values[n]}" for n in bad)
        raise NonFiniteLoss(f"non-finite {what} at step {step}: {detail}; stopping without "
                            "updating weights or writing a checkpoint")
