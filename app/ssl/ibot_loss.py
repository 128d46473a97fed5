"""iBOT loss: masked-image modelling as cross-entropy on the masked patch tokens.

The student sees the global crops with some patches replaced by the mask token; for each masked
position it predicts the teacher's (unmasked) prototype distribution. Every masked image counts
equally whatever its number of masked patches (each patch weighs 1 / n_masked(image)), and the
sum is divided by the number of global-crop images (2B, unmasked images included), as in DINOv2.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _patch_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """[..., K] x [..., K] -> [...] float32 cross-entropy against log_softmax(s / temp)."""
    log_p = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


def ibot_patch_loss(
    student_patch_logits: Tensor,
    teacher_patch_probs: Tensor,
    masks: Tensor,
    student_temp: float = 0.1,
) -> Tensor:
    """Dense form over all patches.

    student_patch_logits, teacher_patch_probs: [B, N, K]; masks: [B, N] bool (True = masked).
    Returns a float32 scalar: mean over the B images of (mean CE over that image's masked
    patches); an image with no masked patch contributes 0 but still counts in B.
    """
    if masks.shape != student_patch_logits.shape[:2]:
        raise ValueError(f"masks {tuple(masks.shape)} must match logits [B, N] {tuple(student_patch_logits.shape[:2])}")
    ce = _patch_cross_entropy(student_patch_logits, teacher_patch_probs, student_temp)  # [B, N]
    m = masks.to(ce.dtype)
    per_image = (ce * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
    return per_image.mean()


def ibot_patch_loss_masked(
    student_masked_logits: Tensor,
    teacher_masked_probs: Tensor,
    masks_weight: Tensor,
    n_images: int,
    student_temp: float = 0.1,
) -> Tensor:
    """Masked-only form used by the meta-architecture (static-shape friendly).

    student_masked_logits, teacher_masked_probs: [M, K] for the M masked patches, in the order of
    `mask_indices_list` from the collate; masks_weight: [M], 1 / n_masked(image of that patch);
    n_images: number of global-crop images the masks came from (2B, masks.shape[0]).
    Returns the float32 scalar `sum(CE * masks_weight) / n_images`; equal to `ibot_patch_loss`
    on the dense tensors.
    """
    if n_images <= 0:
        raise ValueError(f"n_images must be > 0, got {n_images}")
    m = student_masked_logits.shape[0]
    ce = _patch_cross_entropy(student_masked_logits, teacher_masked_probs[:m], student_temp)
    return (ce * masks_weight[:m].float()).sum() / n_images
