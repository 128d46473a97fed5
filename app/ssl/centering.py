"""Teacher "centering": how raw teacher head logits become target probabilities.

Two methods, as in DINOv2 (`train.centering`):

* softmax centering: `softmax((t - center) / teacher_temp)` with `center` an EMA (momentum 0.9)
  of the batch-mean teacher logits, averaged over all ranks;
* Sinkhorn-Knopp: a few alternating row/column normalisations that make the batch of targets
  use every prototype equally (SwAV-style optimal transport).

All reductions across ranks go through `all_reduce_sum` / `all_reduce_max`, which are no-ops when
torch.distributed is not initialised or the world has one process, so the same code runs in a
single process and under torchrun.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


# ------------------------------------------------------------------------------------------------
# The one place that talks to torch.distributed.
# ------------------------------------------------------------------------------------------------


def distributed_world_size() -> int:
    """Number of processes sharing the batch (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """In-place sum over ranks; returns `tensor`. A no-op in a single process."""
    if distributed_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    """In-place max over ranks; returns `tensor`. A no-op in a single process."""
    if distributed_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# ------------------------------------------------------------------------------------------------
# Softmax centering.
# ------------------------------------------------------------------------------------------------


def softmax_center_teacher(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Target probabilities `softmax((t - center) / teacher_temp)`, computed in fp32.

    teacher_logits: [B, K] (any float dtype); center: [1, K] or [K]. Returns [B, K] float32.
    """
    logits = (teacher_logits.float() - center.float()) / teacher_temp
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def batch_center(teacher_logits: Tensor) -> Tensor:
    """Mean teacher logit over the global batch (all ranks): [B, K] -> [1, K] float32."""
    total = teacher_logits.float().sum(dim=0, keepdim=True)
    all_reduce_sum(total)
    n = teacher_logits.shape[0] * distributed_world_size()
    return total / n


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> Tensor:
    """EMA of the batch-mean teacher logits: `center * m + mean(t) * (1 - m)`.

    center: [1, K]; teacher_logits: [B, K] (the local batch; averaged over all ranks here).
    Returns the new center (a new tensor; the caller keeps it as the module's buffer). The mean
    uses the global batch so that every rank holds the same center, which keeps teacher targets
    identical to a single-process run over the concatenated batch.
    """
    return center.float() * momentum + batch_center(teacher_logits) * (1.0 - momentum)


# ------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp.
# ------------------------------------------------------------------------------------------------


def _logsumexp_over_ranks(log_q: Tensor, dim: int) -> Tensor:
    """log(sum(exp(log_q))) along `dim`, where `dim` may be split across ranks.

    Stable: the per-slice maximum (taken over all ranks) is subtracted before exp, so the largest
    term is exp(0) = 1 and the sum never underflows to 0 nor overflows.
    """
    if log_q.shape[dim] == 0:  # a rank may hold no samples (e.g. no masked patches)
        shape = list(log_q.shape)
        shape[dim] = 1
        peak = torch.full(shape, -math.inf, device=log_q.device)
    else:
        peak = log_q.amax(dim=dim, keepdim=True)
    all_reduce_max(peak)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (log_q - peak).exp_().sum(dim=dim, keepdim=True)  # one [K, B]-sized temporary
    all_reduce_sum(total)
    return torch.log(total) + peak


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: int | Tensor | None = None,
) -> Tensor:
    """Sinkhorn-Knopp targets for a batch of teacher logits split across ranks.

    teacher_logits: [B_local, K]. Returns [B_local, K] float32 probabilities: every row (sample)
    sums to 1, and over the global batch every prototype (column) gets mass ~ B / K.

    The official algorithm is `Q = exp(t / temp).T` ([K, B]), `Q /= sum(Q)` (global), then
    `n_iterations` times: rows `Q /= sum_rows(Q) * K` (global, prototypes get equal mass 1/K),
    columns `Q /= sum_cols(Q) * B` (samples get mass 1/B); finally `Q *= B` so each sample's
    column sums to 1. `B` is the global number of samples: local batch x world size for DINO, the
    all-reduced count of masked patches for iBOT (pass it as `n_samples`: the local count; it is
    summed over ranks here).

    Numerics: we run the same iterations in log space. The official code exponentiates
    `t / temp` directly, which overflows for logits of a few units at temp 0.04 (issue #360),
    and even after subtracting the global max a whole prototype row can underflow to 0, giving
    0/0. Working with `log Q` is exactly equivalent because each step only multiplies `Q` by
    positive per-row or per-column factors (and the first step by a global constant), so
    subtracting any constant from the logits (e.g. the global max) cancels in the first
    normalisation; in log space those factors become subtractions of a stable log-sum-exp.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [B, K], got shape {tuple(teacher_logits.shape)}")
    n_local, n_prototypes = teacher_logits.shape
    if n_samples is None:
        n_total = torch.tensor(float(n_local), device=teacher_logits.device)
    else:
        n_total = torch.as_tensor(n_samples, dtype=torch.float32, device=teacher_logits.device).clone()
        n_total = n_total.reshape(())
    all_reduce_sum(n_total)
    log_b = torch.log(n_total)
    log_k = math.log(n_prototypes)

    log_q = (teacher_logits.float() / teacher_temp).t()  # [K, B_local]
    # Q /= sum(Q) over everything (all ranks): one global log-sum-exp.
    # In-place updates keep the peak memory at ~2x [K, B] (K can be 131k, B ~1000 masked patches).
    log_q.sub_(_logsumexp_over_ranks(log_q.reshape(1, log_q.numel()), dim=1).reshape(()))

    for _ in range(n_iterations):
        # Each prototype (row) gets total mass 1/K; its samples live on all ranks.
        log_q.sub_(_logsumexp_over_ranks(log_q, dim=1) + log_k)
        # Each sample (column) gets total mass 1/B; a column is local to its rank.
        log_q.sub_(torch.logsumexp(log_q, dim=0, keepdim=True) + log_b)

    # Q *= B: each sample's column now sums to exactly 1.
    return log_q.add_(log_b).exp_().t()
