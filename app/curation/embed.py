"""Stage `embed`: one L2-normalised vector per image of every input dataset.

Each rank takes a disjoint set of shards (round-robin) and writes one part per shard,
`embeddings/<set>/<shard>.npz` (keys, float16 embeddings, 64-bit perceptual hashes); a part that
exists is not recomputed, so an interrupted embed resumes shard by shard. Corrupt images are
skipped and counted. Parts concatenate in shard order, which fixes the row order of a set.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from app import storage
from app.curation.artifacts import CurationRun, get_npz
from app.curation.dedup import phash
from app.curation.knn import l2_normalize

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
THUMBNAIL_SIDE = 16


def build_embedder(cfg: Any) -> Callable[[list], np.ndarray]:
    """images (list of RGB PIL) -> [B, D] float32 L2-normalised embeddings.

    model "vit": the DINOv2 backbone (normalised CLS, or CLS + mean patch token for
    features="cls+mean"), weights from `embed.weights`, a backbone file or run URI (random init
    with a warning when empty).
    model "thumbnail": a weight-free copy descriptor (16x16 colour thumbnail, centred per image).
    """
    ecfg = cfg.curation.embed
    if ecfg.model == "thumbnail":
        def thumbs(images: list) -> np.ndarray:
            arr = np.stack([np.asarray(im.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE)), np.float32).ravel()
                            for im in images])
            return l2_normalize(arr - arr.mean(1, keepdims=True))
        return thumbs

    from torchvision.transforms import v2

    from app.eval.model_ref import resolve_model
    from app.models import build_backbone

    torch.manual_seed(cfg.run.seed)
    if ecfg.weights:
        # A backbone file or a run (its export, else its latest checkpoint); the architecture
        # comes from the weights, so `embed.arch` only sizes the random-init fallback.
        model = resolve_model(ecfg.weights).model
    else:
        log.warning("curation.embed.weights is empty: embedding with a randomly initialised %s",
                    ecfg.arch)
        model = build_backbone(ecfg.arch, patch_size=cfg.model.patch_size, img_size=ecfg.image_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.eval().to(device)
    size = ecfg.image_size
    tf = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    @torch.inference_mode()
    def vit(images: list) -> np.ndarray:
        x = torch.stack([tf(im) for im in images]).to(device)
        out = model.forward_features(x)
        feats = out["x_norm_clstoken"]
        if ecfg.features == "cls+mean":
            feats = torch.cat([feats, out["x_norm_patchtokens"].mean(1)], dim=1)
        return l2_normalize(feats.float().cpu().numpy())
    return vit


def embed_shard(shard_uri: str, embedder: Callable, batch_size: int) -> tuple[dict, dict]:
    """Embed one shard -> (arrays for the part file, counters)."""
    from app.data import CorruptImage, decode_image, iter_shard

    keys, hashes, chunks, corrupt, batch = [], [], [], [], []
    for sample in iter_shard(shard_uri):
        try:
            img = decode_image(sample.image_bytes, sample.key)
        except CorruptImage as exc:
            corrupt.append(sample.key)
            log.warning("skipping %s", exc)
            continue
        keys.append(sample.key)
        hashes.append(phash(img))
        batch.append(img)
        if len(batch) == batch_size:
            chunks.append(embedder(batch))
            batch = []
    if batch:
        chunks.append(embedder(batch))
    emb = np.concatenate(chunks).astype(np.float16) if chunks else np.zeros((0, 0), np.float16)
    arrays = {"keys": np.asarray(keys, dtype=str), "embeddings": emb,
              "phash": np.asarray(hashes, dtype=np.uint64), "corrupt": np.asarray(corrupt, dtype=str)}
    return arrays, {"n": len(keys), "n_corrupt": len(corrupt)}


def part_name(shard_uri: str) -> str:
    return shard_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".npz"


def embed_dataset(run: CurationRun, set_name: str, dataset_uri: str, cfg: Any, rank: int,
                  world_size: int, embedder: Callable | None = None) -> dict[str, Any]:
    """Embed this rank's shards of one dataset; skips parts that exist. Returns counters."""
    from app.data import Dataset

    ds = Dataset(dataset_uri)
    mine = ds.shards_for_rank(rank, world_size)
    done = skipped = n = n_corrupt = 0
    t0 = time.time()
    for shard in mine:
        part = run.uri("embeddings", set_name, part_name(shard))
        if storage.exists(part):
            skipped += 1
            continue
        embedder = embedder or build_embedder(cfg)
        arrays, counts = embed_shard(shard, embedder, cfg.curation.embed.batch_size)
        run.put_arrays(f"embeddings/{set_name}/{part_name(shard)}", **arrays)
        done += 1
        n += counts["n"]
        n_corrupt += counts["n_corrupt"]
        dt = max(time.time() - t0, 1e-9)
        log.info("embed %s: shard %d/%d (%d images, %.1f images/s)", set_name, done + skipped,
                 len(mine), n, n / dt)
    return {"set": set_name, "dataset": ds.uri, "shards": len(mine), "shards_embedded": done,
            "shards_skipped": skipped, "images": n, "corrupt": n_corrupt,
            "seconds": round(time.time() - t0, 2),
            "images_per_s": round(n / max(time.time() - t0, 1e-9), 2)}


def load_set(run: CurationRun, set_name: str, dataset_uri: str) -> dict[str, np.ndarray]:
    """Concatenate the parts of one embedded set in shard order: keys [N], embeddings [N, D]
    float32, phash [N] uint64, corrupt [C]."""
    from app.data import Dataset

    parts = [get_npz(run.uri("embeddings", set_name, part_name(s)))
             for s in Dataset(dataset_uri).shard_uris]
    nonempty = [p for p in parts if p["embeddings"].size]
    dim = nonempty[0]["embeddings"].shape[1] if nonempty else 0
    return {
        "keys": np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, str),
        "embeddings": (l2_normalize(np.concatenate([p["embeddings"] for p in nonempty]))
                       if nonempty else np.zeros((0, dim), np.float32)),
        "phash": np.concatenate([p["phash"] for p in parts]) if parts else np.zeros(0, np.uint64),
        "corrupt": np.concatenate([p["corrupt"] for p in parts]) if parts else np.zeros(0, str),
    }
