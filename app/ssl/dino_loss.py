"""DINO loss: cross-entropy between teacher and student CLS-token prototype distributions.

The student sees 2 (masked) global + n local crops, the teacher the 2 unmasked global crops.
Every student crop is matched with every teacher crop except the teacher's copy of the same
global view. DINOv2 counts all those pairs once and divides by their number:

    pairs = n_global * (n_global - 1)  [global cross pairs, 2 for 2 crops]
          + n_local * n_global         [local x global, 16 for 8 local crops]
    loss_dino = (sum over all pairs of mean-over-images CE) / pairs      (= /18 by default)

The official code reports the two parts separately ("local" over 16 pairs, "global" over the
2 cross pairs), both divided by the same 18; `dino_multicrop_loss` returns them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def dino_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1) -> Tensor:
    """Per-row `-sum_k p_teacher[k] * log_softmax(s / student_temp)[k]`, in fp32.

    student_logits, teacher_probs: [N, K] (any float dtype). Returns [N] float32.
    """
    log_p = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


def dino_loss(
    student_logits_list: Sequence[Tensor],
    teacher_probs_list: Sequence[Tensor],
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> Tensor:
    """Sum over (student crop, teacher crop) pairs of the mean-over-images cross-entropy.

    student_logits_list: S tensors [B, K] (one per student crop, the same B images in order).
    teacher_probs_list: T tensors [B, K] of teacher probabilities (centered or Sinkhorn-Knopp).
    ignore_diagonal: skip pairs (i, i), i.e. a global crop against the teacher's view of the same
    crop (requires the first T student crops to be the teacher's crops in the same order).
    Returns a float32 scalar: the *sum* over pairs (divide by the pair count to average).
    """
    if not student_logits_list or not teacher_probs_list:
        raise ValueError("dino_loss needs at least one student and one teacher crop")
    total = student_logits_list[0].new_zeros((), dtype=torch.float32)
    for i, student_logits in enumerate(student_logits_list):
        log_p = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
        for j, teacher_probs in enumerate(teacher_probs_list):
            if ignore_diagonal and i == j:
                continue
            total = total - (teacher_probs.float() * log_p).sum(dim=-1).mean()
    return total


def dino_pair_count(n_global_crops: int, n_local_crops: int) -> int:
    """Number of (student, teacher) pairs DINO averages over: n_g * (n_g - 1) + n_l * n_g."""
    return n_global_crops * (n_global_crops - 1) + n_local_crops * n_global_crops


def dino_multicrop_loss(
    student_global_logits: Tensor,
    student_local_logits: Tensor | None,
    teacher_global_probs: Tensor,
    n_global_crops: int = 2,
    student_temp: float = 0.1,
) -> dict[str, Tensor]:
    """The two DINO terms of DINOv2, each divided by the total pair count (18 by default).

    student_global_logits: [n_g * B, K], crop-major (all images of crop 0, then crop 1, ...).
    student_local_logits: [n_l * B, K] crop-major, or None/empty when there are no local crops.
    teacher_global_probs: [n_g * B, K] crop-major, *not* swapped: row r is the teacher's target
    for the same crop and image as student row r (the same-view pairs are skipped here).
    Returns {"dino_local_crops_loss": scalar, "dino_global_crops_loss": scalar} (float32); their
    sum is the DINO loss (before `dino.loss_weight`).
    """
    teacher_chunks = list(teacher_global_probs.chunk(n_global_crops))
    global_chunks = list(student_global_logits.chunk(n_global_crops))
    n_images = teacher_chunks[0].shape[0]
    has_local = student_local_logits is not None and student_local_logits.shape[0] > 0
    n_local = student_local_logits.shape[0] // n_images if has_local else 0
    pairs = dino_pair_count(n_global_crops, n_local)
    if pairs == 0:
        raise ValueError("dino_multicrop_loss needs 2+ global crops or some local crops")
    zero = student_global_logits.new_zeros((), dtype=torch.float32)
    local = zero
    if has_local:
        local_chunks = list(student_local_logits.chunk(n_local))
        local = dino_loss(local_chunks, teacher_chunks, student_temp) / pairs
    glob = zero
    if n_global_crops > 1:
        glob = dino_loss(global_chunks, teacher_chunks, student_temp, ignore_diagonal=True) / pairs
    return {"dino_local_crops_loss": local, "dino_global_crops_loss": glob}
