"""A minimal k-NN probe of backbone CLS features, to watch a pretraining run learn.

Weighted k-NN as in DINO/DINOv2 (`dinov2/eval/knn.py`): cosine similarity between L2-normalised
CLS features, the k nearest bank features vote for their labels with weight exp(sim / T).
The full evaluation package lives in `app/eval`; this is the small version the demo uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_images(dataset_uri: str, image_size: int) -> tuple[Tensor, Tensor]:
    """All images of a labelled dataset, resized (bicubic) to image_size: [N, 3, S, S], labels [N]."""
    from PIL import Image

    from app.data.decode import decode_image
    from app.data.index import Dataset

    ds = Dataset(dataset_uri)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    images, labels = [], []
    for i in range(len(ds)):
        sample = ds.get(i)
        if sample.label is None:
            raise ValueError(f"{dataset_uri}: sample {sample.key} has no label")
        img = decode_image(sample.image_bytes, sample.key).resize((image_size, image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        images.append((x - mean) / std)
        labels.append(int(sample.label))
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def cls_features(backbone: torch.nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """L2-normalised CLS features [N, D] of `images` [N, 3, S, S]."""
    was_training = backbone.training
    backbone.eval()
    feats = [backbone.forward_features(images[i:i + batch_size])["x_norm_clstoken"].float()
             for i in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return F.normalize(torch.cat(feats), dim=-1)


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of weighted k-NN. bank [Nb, D], queries [Nq, D] L2-normalised."""
    k = min(k, len(bank))
    sims, idx = (queries @ bank.t()).topk(k, dim=1)  # [Nq, k]
    n_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(len(queries), n_classes)
    votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
    return 100.0 * (votes.argmax(1) == query_labels).float().mean().item()


def knn_probe(backbone: torch.nn.Module, train_uri: str, val_uri: str, image_size: int,
              k: int = 20, temperature: float = 0.07) -> float:
    """k-NN accuracy (%) of `val_uri` queries against the `train_uri` bank."""
    bank_x, bank_y = load_images(train_uri, image_size)
    val_x, val_y = load_images(val_uri, image_size)
    return knn_accuracy(cls_features(backbone, bank_x), bank_y, cls_features(backbone, val_x), val_y,
                        k, temperature)
