"""A copy-detection descriptor on top of the frozen curation ViT, trained on the pool itself.

DINOv2 de-duplicates with a copy-detection embedder (SSCD, Pizzi et al. 2022; reference/
curation.md §1.3-1.4), not with its retrieval embedding: a DINO embedding is trained to be
invariant to crops and colour changes and puts images of one concept close together, so at the
paper's cosine 0.6 it merges whole classes. We ship no SSCD weights, so the curation run learns
the equivalent from its own pool, self-supervised, the way SSCD is trained:

* input: frozen backbone features that keep the image layout, the L2-normalised CLS token next
  to a `grid` x `grid` average pooling of the patch tokens (each cell L2-normalised), since an
  edited copy keeps its layout while another image of the same concept does not; plus a tiny
  `thumbnail` x `thumbnail` colour thumbnail, because a DINO backbone is trained to ignore
  colour and near-featureless images (plain gradients) differ in little else;
* views: generic copy edits of each training image (crop up to 10% per side, rescale 0.8-1.2x,
  contrast and brightness +-15-20%, JPEG quality 40-95);
* head: centring + a linear map to `dim` dimensions, trained with a symmetric InfoNCE loss
  (temperature `temperature`) between two views of one image against the rest of the batch,
  plus SSCD's KoLeo entropy term (weight `koleo`) that spreads unrelated images apart.

The descriptor is the L2-normalised head output; cosine 0.6 then separates edited copies from
distinct images (numbers: docs/benchmarks.md, scripts/bench/dedup_quality.py).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def layout_features(out: dict[str, torch.Tensor], grid: int) -> torch.Tensor:
    """Backbone `forward_features` output -> [B, D * (1 + grid^2)] float32: normalised CLS next to
    the normalised grid-pooled patch tokens (the pooled block as a whole has unit norm too)."""
    cls = F.normalize(out["x_norm_clstoken"].float(), dim=-1)
    patches = out["x_norm_patchtokens"].float()
    b, n, d = patches.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"copy head needs a square patch grid, got {n} patch tokens")
    fmap = patches.transpose(1, 2).reshape(b, d, side, side)
    cells = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)  # [B, grid^2, D]
    cells = F.normalize(cells, dim=-1).reshape(b, -1) / grid
    return torch.cat([cls, cells], dim=1)


def colour_thumbnail(images: list, side: int) -> np.ndarray:
    """[B, side*side*3] float32: each PIL image shrunk to side x side RGB, centred per image,
    L2-normalised (a weight-free copy descriptor on its own)."""
    from app.curation.knn import l2_normalize

    arr = np.stack([np.asarray(im.convert("RGB").resize((side, side)), np.float32).ravel()
                    for im in images])
    return l2_normalize(arr - arr.mean(1, keepdims=True))


def head_input(out: dict[str, torch.Tensor], images: list, grid: int, thumbnail: int) -> np.ndarray:
    """What the head reads: layout features, and the colour thumbnail when thumbnail > 0."""
    feats = layout_features(out, grid).numpy()
    if thumbnail > 0:
        feats = np.concatenate([feats, colour_thumbnail(images, thumbnail)], axis=1)
    return feats


def copy_edit(img, rng: np.random.Generator):
    """One generic copy edit of a PIL RGB image (layout kept: no flips or large crops)."""
    from PIL import Image

    w, h = img.size
    left, top, right, bottom = (rng.uniform(0.0, 0.1) for _ in range(4))
    img = img.crop((int(left * w), int(top * h), w - int(right * w), h - int(bottom * h)))
    scale = rng.uniform(0.8, 1.2)
    img = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))),
                     Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.85, 1.15) + mean * rng.uniform(0.8, 1.2)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                              quality=int(rng.integers(40, 96)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@dataclass
class CopyHead:
    mean: np.ndarray  # [D_in] float32, centre of the training features
    weight: np.ndarray  # [dim, D_in] float32
    grid: int
    thumbnail: int
    stats: dict

    def __call__(self, feats: np.ndarray | torch.Tensor) -> np.ndarray:
        """head inputs [B, D_in] (`head_input`) -> copy descriptors [B, dim] float32,
        L2-normalised."""
        f = torch.as_tensor(np.asarray(feats, dtype=np.float32))
        z = (f - torch.from_numpy(self.mean)) @ torch.from_numpy(self.weight).T
        return F.normalize(z, dim=-1).numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "weight": self.weight, "grid": np.array(self.grid),
                "thumbnail": np.array(self.thumbnail)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "CopyHead":
        return cls(a["mean"].astype(np.float32), a["weight"].astype(np.float32), int(a["grid"]),
                   int(a["thumbnail"]), {})


def koleo(z: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko entropy surrogate of L2-normalised rows: minus the mean log distance
    to the nearest other row (lower when rows spread out)."""
    sim = z @ z.T
    sim.fill_diagonal_(-2.0)
    nearest = sim.max(dim=1).values
    return -torch.log(torch.sqrt(torch.clamp(2.0 - 2.0 * nearest, min=1e-8))).mean()


def train_copy_head(views: torch.Tensor, dim: int = 256, temperature: float = 0.15,
                    koleo_weight: float = 1.0, steps: int = 400, batch_size: int = 256,
                    lr: float = 1e-3, seed: int = 0, grid: int = 4, thumbnail: int = 0) -> CopyHead:
    """Fit the head on head inputs of views [N, V, D_in] (view 0: the image as stored, the
    others copy edits). Each step pairs two different views of batch_size images. grid and
    thumbnail record how the inputs were made."""
    n, v, d_in = views.shape
    if n < 2 or v < 2:
        raise ValueError(f"copy head needs >= 2 images with >= 2 views each, got {n} x {v}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean = views[:, 0].mean(0)
    head = torch.nn.Linear(d_in, dim, bias=False)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    bs = min(batch_size, n)
    t0 = time.time()
    losses = []
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:bs]
        a = torch.randint(0, v, (bs,), generator=gen)
        b = (a + torch.randint(1, v, (bs,), generator=gen)) % v  # a different view
        za = F.normalize(head(views[idx, a] - mean), dim=1)
        zb = F.normalize(head(views[idx, b] - mean), dim=1)
        logits = za @ zb.T / temperature
        target = torch.arange(bs)
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        loss = nce + koleo_weight * koleo(za)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(nce.detach()))
    stats = {"images": n, "views": v, "in_dim": d_in, "dim": dim, "steps": steps,
             "temperature": temperature, "koleo": koleo_weight,
             "infonce_first": round(losses[0], 4), "infonce_last": round(float(np.mean(losses[-20:])), 4),
             "seconds": round(time.time() - t0, 2)}
    log.info("copy head: %d images x %d views, InfoNCE %.3f -> %.3f in %.1fs", n, v,
             stats["infonce_first"], stats["infonce_last"], stats["seconds"])
    return CopyHead(mean.numpy(), head.weight.detach().numpy().copy(), grid, thumbnail, stats)


def fit_on_images(images: list, forward, cfg: Any, seed: int) -> CopyHead:
    """Head inputs of each image and `views - 1` copy edits of it, then `train_copy_head`.
    forward: list of PIL images -> the backbone's forward_features output; cfg: CopyHeadConfig."""
    h = cfg
    rng = np.random.default_rng(seed)

    def inputs(ims: list) -> np.ndarray:
        return head_input(forward(ims), ims, h.grid, h.thumbnail)

    per_view = [inputs(images)] + [inputs([copy_edit(im, rng) for im in images])
                                   for _ in range(h.views - 1)]
    views = torch.from_numpy(np.stack(per_view, axis=1))
    return train_copy_head(views, dim=h.dim, temperature=h.temperature, koleo_weight=h.koleo,
                           steps=h.steps, batch_size=h.batch_size, seed=seed, grid=h.grid,
                           thumbnail=h.thumbnail)
