"""Linear probe on frozen features with a small lr x weight-decay grid.

The DINOv2 protocol trains many linear heads at once and picks the best on validation data.
Here features are extracted once (cached), so every head trains on the same feature tensors in
full-batch-style mini-batches; the grid point is chosen on a held-out part of the training set
and only then evaluated on the validation set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearProbeResult:
    top1: float  # validation accuracy (%) of the selected head
    lr: float
    weight_decay: float
    heldout_top1: float  # accuracy (%) on the held-out split that chose the head
    grid: dict  # "(lr, wd)" -> held-out accuracy
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [D] feature standardisation learned on train
    std: torch.Tensor  # [D]


def _train_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, lr: float, wd: float, epochs: int,
                batch_size: int, generator: torch.Generator) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = max(1, epochs * ((x.shape[0] + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


def _accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean() * 100.0)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    lrs: list[float] | tuple[float, ...] = (1e-3, 1e-2, 1e-1),
    weight_decays: list[float] | tuple[float, ...] = (0.0, 1e-4),
    epochs: int = 100,
    batch_size: int = 256,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> LinearProbeResult:
    """Select (lr, wd) on a held-out part of train, retrain on all of train, report on val.

    train_features [N, D], train_labels [N], val_features [M, D], val_labels [M].
    """
    if train_features.shape[0] < 2:
        raise ValueError("linear probe needs at least 2 training samples")
    g = torch.Generator().manual_seed(seed)
    x = train_features.float()
    y = train_labels.long()
    num_classes = int(max(int(y.max()), int(val_labels.max()))) + 1
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs, vs = (x - mean) / std, (val_features.float() - mean) / std

    perm = torch.randperm(x.shape[0], generator=g)
    n_held = max(1, int(round(heldout_fraction * x.shape[0])))
    held, fit = perm[:n_held], perm[n_held:]
    if fit.numel() == 0:
        fit = held
    grid = {}
    best = None
    for lr in lrs:
        for wd in weight_decays:
            head = _train_head(xs[fit], y[fit], num_classes, lr, wd, epochs, batch_size,
                               torch.Generator().manual_seed(seed))
            acc = _accuracy(head, xs[held], y[held])
            grid[f"({lr}, {wd})"] = acc
            if best is None or acc > best[0]:
                best = (acc, lr, wd)
    assert best is not None
    held_acc, lr, wd = best
    head = _train_head(xs, y, num_classes, lr, wd, epochs, batch_size, torch.Generator().manual_seed(seed))
    top1 = _accuracy(head, vs, val_labels.long())
    return LinearProbeResult(top1, lr, wd, held_acc, grid, head.weight.detach().clone(),
                             head.bias.detach().clone(), mean, std)
