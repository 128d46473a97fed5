"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator).

Spreads the student's CLS features over the sphere by pushing up the distance from each sample
to its nearest neighbour in the batch: `-mean(log(d_nn + eps))` on L2-normalised features. DINOv2
applies it per global crop on the (pre-head) backbone CLS, on the local per-rank batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

_warned_single = False


def nearest_neighbour_indices(x: Tensor) -> Tensor:
    """For L2-normalised rows x [B, D], the index [B] of each row's nearest other row.

    On the unit sphere the nearest neighbour is the one with the largest dot product; the
    diagonal (each sample with itself) is excluded.
    """
    dots = x @ x.t()
    dots.fill_diagonal_(-float("inf"))
    return dots.argmax(dim=1)


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo loss of one batch of features.

    features: [B, D] (any float dtype; computed in fp32). Returns a float32 scalar
    `-mean_i log(||x_i - x_nn(i) + eps|| + eps)` with x = features / ||features||. The eps
    inside the norm (as in `nn.PairwiseDistance`) keeps the gradient finite when two samples
    coincide. With B < 2 there is no neighbour: the official code returns inf/NaN (issue #314);
    we return 0 (still attached to the graph) and warn once.
    """
    global _warned_single
    if features.ndim != 2:
        raise ValueError(f"features must be [B, D], got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        if not _warned_single:
            warnings.warn("koleo_loss: batch of 1 per rank has no nearest neighbour; returning 0", stacklevel=2)
            _warned_single = True
        return features.float().sum() * 0.0
    x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        idx = nearest_neighbour_indices(x)
    distances = torch.linalg.vector_norm(x - x[idx] + eps, dim=-1)
    return -torch.log(distances + eps).mean()


def koleo_loss_per_crop(student_cls: Tensor, n_crops: int, eps: float = 1e-8) -> Tensor:
    """DINOv2's use: the sum over crops of KoLeo within each crop (never across two crops of the
    same image). student_cls: [n_crops * B, D] crop-major backbone CLS (pre-head). Returns the
    float32 scalar to multiply by `dino.koleo_loss_weight` (0.1)."""
    return sum(koleo_loss(chunk, eps) for chunk in student_cls.chunk(n_crops))
