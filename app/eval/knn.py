"""Weighted k-NN classification on L2-normalised features (the DINO/DINOv2 protocol).

Each query takes its k most similar training features (cosine similarity), weights their votes
by exp(similarity / T) (T = 0.07) and predicts the class with the largest summed weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores of each query.

    train_features [N, D], train_labels [N] (int64), query_features [Q, D] -> scores [Q, C].
    Features are L2-normalised here, so callers may pass raw features.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"train_features has {train_features.shape[0]} rows but train_labels has {train_labels.shape[0]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    k_eff = min(k, bank.shape[0])
    out = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k_eff, dim=1)  # [q, k]
        weights = (sims / temperature).exp()
        votes = torch.zeros(q.shape[0], c, dtype=weights.dtype)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, c)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    ks: tuple[int, ...] | list[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
) -> dict[int, float]:
    """Top-1 accuracy (in %) for every k."""
    num_classes = int(max(int(train_labels.max()), int(query_labels.max()))) + 1
    results = {}
    for k in ks:
        scores = knn_predict_scores(train_features, train_labels, query_features, k, temperature, num_classes)
        results[int(k)] = float((scores.argmax(1) == query_labels.long()).float().mean() * 100.0)
    return results


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy (in %) of each class; NaN for classes absent from `target`."""
    accs = []
    for c in range(num_classes):
        sel = target == c
        accs.append(float((pred[sel] == c).float().mean() * 100.0) if sel.any() else float("nan"))
    return accs


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] counts: rows are true classes, columns predictions."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((target.long(), pred.long()), torch.ones_like(target, dtype=torch.long), accumulate=True)
    return cm


def knn_predictions(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    ks: tuple[int, ...] | list[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted class [Q] for every k, from one top-max(k) search (k capped to the bank size).

    Same votes as `knn_predict_scores`: top-k cosine similarities weighted by exp(sim / T).
    """
    if not ks:
        raise ValueError("ks must name at least one k")
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    k_max = min(max(ks), bank.shape[0])
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k_max, dim=1)  # sorted, so the first k are the top k
        weights = (sims / temperature).exp()
        neighbour_labels = labels[idx]
        for k in preds:
            kk = min(k, k_max)
            votes = torch.zeros(q.shape[0], c, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in preds.items()}
