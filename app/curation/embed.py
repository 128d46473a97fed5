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
from app.progress import format_progress

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
THUMBNAIL_SIDE = 16


def uses_copy_head(cfg: Any) -> bool:
    """Does dedup compare copy-head descriptors (else the embeddings themselves)?"""
    d = cfg.curation.dedup.descriptor
    return d == "copy_head" or (d == "auto" and cfg.curation.embed.model == "vit")


def _vit_forward(cfg: Any) -> Callable[[list], dict]:
    """images (list of RGB PIL) -> the curation backbone's forward_features output."""
    from torchvision.transforms import v2

    from app.eval.model_ref import resolve_model
    from app.models import build_backbone

    ecfg = cfg.curation.embed
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
    def forward(images: list) -> dict:
        out = model.forward_features(torch.stack([tf(im) for im in images]).to(device))
        return {k: v.float().cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}
    return forward


def build_embedder(cfg: Any, copy_head: Any = None) -> Callable[[list], dict[str, np.ndarray]]:
    """images (list of RGB PIL) -> {"embeddings": [B, D] float32 L2-normalised, and with a copy
    head "copy": [B, dim] copy-detection descriptors}.

    model "vit": the DINOv2 backbone (normalised CLS, or CLS + mean patch token for
    features="cls+mean"), weights from `embed.weights`, a backbone file or run URI (random init
    with a warning when empty).
    model "thumbnail": a weight-free copy descriptor (16x16 colour thumbnail, centred per image).
    """
    from app.curation.copy_head import colour_thumbnail, head_input

    ecfg = cfg.curation.embed
    if ecfg.model == "thumbnail":
        def thumbs(images: list) -> dict[str, np.ndarray]:
            return {"embeddings": colour_thumbnail(images, THUMBNAIL_SIDE)}
        return thumbs

    forward = _vit_forward(cfg)

    def vit(images: list) -> dict[str, np.ndarray]:
        out = forward(images)
        feats = out["x_norm_clstoken"]
        if ecfg.features == "cls+mean":
            feats = torch.cat([feats, out["x_norm_patchtokens"].mean(1)], dim=1)
        result = {"embeddings": l2_normalize(feats.numpy())}
        if copy_head is not None:
            result["copy"] = copy_head(head_input(out, images, copy_head.grid, copy_head.thumbnail))
        return result
    return vit


COPY_HEAD = "embeddings/copy_head.npz"


def _sample_images(dataset_uri: str, n: int, seed: int) -> list:
    """Up to n decodable images of a dataset: whole shards in a seeded random order."""
    from app.data import CorruptImage, Dataset, decode_image, iter_shard

    rng = np.random.default_rng(seed)
    shards = Dataset(dataset_uri).shard_uris
    images: list = []
    for i in rng.permutation(len(shards)):
        for sample in iter_shard(shards[i]):
            try:
                images.append(decode_image(sample.image_bytes, sample.key))
            except CorruptImage:
                continue
        if len(images) >= n:
            break
    keep = np.sort(rng.permutation(len(images))[:n])
    return [images[j] for j in keep]


def fit_copy_head(cfg: Any, pool_uri: str) -> Any:
    """A copy head (`curation.dedup.copy_head` settings) fitted with the configured backbone on
    a seeded sample of the pool's images."""
    from app.curation.copy_head import fit_on_images

    h = cfg.curation.dedup.copy_head
    images = _sample_images(pool_uri, h.train_images, cfg.run.seed)
    if len(images) < 2:
        raise ValueError(f"copy head: the pool {pool_uri} has fewer than 2 readable images")
    return fit_on_images(images, _vit_forward(cfg), h, cfg.run.seed)


def ensure_copy_head(run: CurationRun, cfg: Any, comm: Any) -> Any:
    """The run's copy head: fitted once on rank 0 on a sample of the pool and kept in the run
    tree (a resumed or distributed embed uses the same one). Collective."""
    from app.curation.copy_head import CopyHead

    if comm.rank == 0 and not storage.exists(run.uri(COPY_HEAD)):
        head = fit_copy_head(cfg, cfg.curation.pool)
        storage.put_json(run.uri("embeddings", "copy_head.json"), head.stats)
        run.put_arrays(COPY_HEAD, **head.arrays())
    comm.barrier()
    return CopyHead.from_arrays(run.get_arrays(COPY_HEAD))


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
    arrays = {"keys": np.asarray(keys, dtype=str), "phash": np.asarray(hashes, dtype=np.uint64),
              "corrupt": np.asarray(corrupt, dtype=str)}
    for name in (chunks[0] if chunks else {"embeddings": None}):
        arrays[name] = (np.concatenate([c[name] for c in chunks]).astype(np.float16) if chunks
                        else np.zeros((0, 0), np.float16))
    return arrays, {"n": len(keys), "n_corrupt": len(corrupt)}


def part_name(shard_uri: str) -> str:
    return shard_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".npz"


def embed_dataset(run: CurationRun, set_name: str, dataset_uri: str, cfg: Any, rank: int,
                  world_size: int, embedder: Callable | None = None,
                  copy_head: Any = None) -> dict[str, Any]:
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
        embedder = embedder or build_embedder(cfg, copy_head)
        arrays, counts = embed_shard(shard, embedder, cfg.curation.embed.batch_size)
        run.put_arrays(f"embeddings/{set_name}/{part_name(shard)}", **arrays)
        done += 1
        n += counts["n"]
        n_corrupt += counts["n_corrupt"]
        dt = max(time.time() - t0, 1e-9)
        log.info("%s", format_progress(f"embed.{set_name}", done + skipped, len(mine), "shards", dt,
                                       skipped, images=n, **{"img/s": n / dt}))
    return {"set": set_name, "dataset": ds.uri, "shards": len(mine), "shards_embedded": done,
            "shards_skipped": skipped, "images": n, "corrupt": n_corrupt,
            "seconds": round(time.time() - t0, 2),
            "images_per_s": round(n / max(time.time() - t0, 1e-9), 2)}


def load_set(run: CurationRun, set_name: str, dataset_uri: str) -> dict[str, np.ndarray]:
    """Concatenate the parts of one embedded set in shard order: keys [N], embeddings [N, D]
    float32, phash [N] uint64, corrupt [C], and copy [N, dim] float32 when the parts have
    copy-head descriptors."""
    from app.data import Dataset

    parts = [get_npz(run.uri("embeddings", set_name, part_name(s)))
             for s in Dataset(dataset_uri).shard_uris]
    nonempty = [p for p in parts if p["embeddings"].size]
    dim = nonempty[0]["embeddings"].shape[1] if nonempty else 0
    out = {
        "keys": np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, str),
        "embeddings": (l2_normalize(np.concatenate([p["embeddings"] for p in nonempty]))
                       if nonempty else np.zeros((0, dim), np.float32)),
        "phash": np.concatenate([p["phash"] for p in parts]) if parts else np.zeros(0, np.uint64),
        "corrupt": np.concatenate([p["corrupt"] for p in parts]) if parts else np.zeros(0, str),
    }
    if nonempty and all("copy" in p for p in nonempty):
        out["copy"] = l2_normalize(np.concatenate([p["copy"] for p in nonempty]))
    return out
