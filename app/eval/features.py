"""Frozen-backbone features of a labelled dataset, with a content-addressed cache.

    feats = dataset_features(model, "file:///.../eval_train", store, image_size=224)
    feats.cls            # [N, D]  normalised CLS token (what k-NN uses)
    feats.patch_mean     # [N, D]  mean of the normalised patch tokens
    feats.cls_blocks     # [N, n, D] CLS of the last n blocks (n = n_last_blocks; last = cls)

Eval transform (the DINOv2 protocol, scaled): resize the shorter side to image_size * 256/224
(bicubic), centre-crop image_size, ImageNet normalisation. Corrupt images are skipped and counted.
The cache key is (model fingerprint, dataset URI + sha256 of its index, transform parameters),
so a changed model, dataset or transform never reuses stale features.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from app import storage
from app.progress import format_progress

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1  # bump when the extraction itself changes
_LOG_EVERY_S = 10.0


# -- transform ----------------------------------------------------------------------------------


def resize_size(image_size: int) -> int:
    """Shorter-side size before the centre crop: 256 for 224, scaled the same way otherwise."""
    return int(round(image_size * 256 / 224))


def eval_transform(image_size: int):
    """PIL RGB image -> normalised float tensor [3, image_size, image_size]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    size = resize_size(image_size)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def apply(img) -> Tensor:
        img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [image_size, image_size])
        x = TF.pil_to_tensor(img).float().div_(255.0)
        return (x - mean) / std

    return apply


def transform_params(image_size: int) -> dict[str, Any]:
    return {"image_size": image_size, "resize": resize_size(image_size), "interpolation": "bicubic",
            "crop": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


# -- identity of inputs -------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) and the shape-free settings
    that change outputs (heads, interpolation), so equal weights give equal fingerprints
    whatever file they came from."""
    h = hashlib.sha256()
    settings = {k: getattr(model, k, None) for k in (
        "embed_dim", "depth", "num_heads", "patch_size", "num_register_tokens",
        "interpolate_offset", "interpolate_antialias")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def index_sha256(dataset_uri: str) -> str:
    from app.data.shards import INDEX_NAME

    return hashlib.sha256(storage.get_bytes(storage.join(dataset_uri, INDEX_NAME))).hexdigest()


def cache_key(fingerprint: str, dataset_uri: str, index_sha: str, image_size: int,
              n_last_blocks: int) -> str:
    ident = {"v": CACHE_VERSION, "model": fingerprint, "dataset": dataset_uri, "index": index_sha,
             "transform": transform_params(image_size), "n_last_blocks": n_last_blocks}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cache_uri(store: str, key: str) -> str:
    return storage.join(storage.to_uri(store), "cache", "features", f"{key}.pt")


# -- the feature set ----------------------------------------------------------------------------


@dataclass
class FeatureSet:
    cls: Tensor  # [N, D]
    patch_mean: Tensor  # [N, D]
    cls_blocks: Tensor  # [N, n, D], last entry == cls
    labels: Tensor  # [N] int64
    keys: list[str]
    corrupt: list[str] = field(default_factory=list)  # keys skipped as undecodable
    classes: list[str] = field(default_factory=list)  # class names by label (may be empty)
    dataset_uri: str = ""
    index_sha256: str = ""
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def linear_input(self, features: str = "cls", n_last_blocks: int = 1) -> Tensor:
        """[N, (n + mean?) * D]: CLS of the last n blocks, plus the mean patch token for
        features="cls+mean" (the official linear-probe input)."""
        if n_last_blocks > self.cls_blocks.shape[1]:
            raise ValueError(f"eval.linear_n_last_blocks={n_last_blocks} but features hold "
                             f"{self.cls_blocks.shape[1]} blocks")
        parts = [self.cls_blocks[:, -n_last_blocks:].flatten(1)]
        if features == "cls+mean":
            parts.append(self.patch_mean)
        elif features != "cls":
            raise ValueError(f"eval.linear_features must be cls or cls+mean, got {features!r}")
        return torch.cat(parts, dim=1)

    def to_payload(self) -> dict[str, Any]:
        return {"cls": self.cls, "patch_mean": self.patch_mean, "cls_blocks": self.cls_blocks,
                "labels": self.labels, "keys": self.keys, "corrupt": self.corrupt,
                "classes": self.classes, "dataset_uri": self.dataset_uri,
                "index_sha256": self.index_sha256}

    @classmethod
    def from_payload(cls, data: dict[str, Any], from_cache: bool = False) -> "FeatureSet":
        return cls(data["cls"], data["patch_mean"], data["cls_blocks"], data["labels"],
                   list(data["keys"]), list(data["corrupt"]), list(data["classes"]),
                   data["dataset_uri"], data["index_sha256"], from_cache)


# -- extraction ---------------------------------------------------------------------------------


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def forward_batch(model: nn.Module, x: Tensor, n_last_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, 3, H, W] -> (cls [B, D], patch_mean [B, D], cls_blocks [B, n, D]) in one pass."""
    outs = model.get_intermediate_layers(x, n=n_last_blocks, return_class_token=True, norm=True)
    cls_blocks = torch.stack([c for _, c in outs], dim=1)
    patches_last = outs[-1][0]
    return cls_blocks[:, -1], patches_last.mean(dim=1), cls_blocks


def extract_features(model: nn.Module, dataset_uri: str, image_size: int = 224, batch_size: int = 64,
                     n_last_blocks: int = 1, num_workers: int = 2,
                     device: torch.device | None = None) -> FeatureSet:
    """Features of every decodable image of a labelled dataset (see module docstring)."""
    from app.data.decode import CorruptImage, decode_image
    from app.data.index import Dataset

    patch = int(getattr(model, "patch_size", 14))
    if image_size < patch or image_size % patch:
        raise ValueError(f"eval.image_size must be a positive multiple of the patch size {patch}, "
                         f"got {image_size}")
    if n_last_blocks < 1:
        raise ValueError(f"eval.linear_n_last_blocks must be >= 1, got {n_last_blocks}")
    dataset = Dataset(dataset_uri)
    total = len(dataset)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.eval().to(device)
    tf = eval_transform(image_size)

    def load(sample):
        if sample.label is None:
            raise ValueError(f"{dataset.uri}: sample '{sample.key}' has no label "
                             "(evaluation needs a labelled dataset)")
        try:
            return tf(decode_image(sample.image_bytes, sample.key))
        except CorruptImage as exc:
            log.warning("skipping corrupt image %s", exc)
            return None

    cls_l, mean_l, blocks_l, labels, keys, corrupt = [], [], [], [], [], []
    started = last_log = time.monotonic()
    done = 0

    def finish(batch, futures) -> None:
        nonlocal done, last_log
        ok = [(s, f.result()) for s, f in zip(batch, futures)]
        corrupt.extend(s.key for s, x in ok if x is None)
        ok = [(s, x) for s, x in ok if x is not None]
        done += len(batch)
        if ok:
            x = torch.stack([x for _, x in ok]).to(device)
            c, m, b = forward_batch(model, x, n_last_blocks)
            cls_l.append(c.float().cpu())
            mean_l.append(m.float().cpu())
            blocks_l.append(b.float().cpu())
            labels.extend(int(s.label) for s, _ in ok)
            keys.extend(s.key for s, _ in ok)
        now = time.monotonic()
        if now - last_log >= _LOG_EVERY_S or done == total:
            last_log = now
            log.info("features %s: %s", dataset.uri, format_progress(
                "eval.features", done, total, "images", now - started,
                **{"img/s": done / max(now - started, 1e-9)}))

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending = None
        # Decode batch i+1 on the threads while the model runs on batch i.
        for batch in _batched(dataset.iter_samples(), batch_size):
            futures = [pool.submit(load, s) for s in batch]
            if pending is not None:
                finish(*pending)
            pending = (batch, futures)
        if pending is not None:
            finish(*pending)

    if not keys:
        raise ValueError(f"{dataset.uri}: no decodable images ({len(corrupt)} corrupt)")
    dim = cls_l[0].shape[1]
    return FeatureSet(torch.cat(cls_l), torch.cat(mean_l), torch.cat(blocks_l).reshape(-1, n_last_blocks, dim),
                      torch.tensor(labels, dtype=torch.long), keys, corrupt, dataset.classes,
                      dataset.uri, "")


def dataset_features(model: nn.Module, dataset_uri: str, store: str | None, image_size: int = 224,
                     batch_size: int = 64, n_last_blocks: int = 1, num_workers: int = 2,
                     use_cache: bool = True, fingerprint: str | None = None) -> FeatureSet:
    """`extract_features` behind the cache `<store>/cache/features/<key>.pt` (atomic writes)."""
    uri = storage.to_uri(dataset_uri).rstrip("/")
    index_sha = index_sha256(uri)
    target = None
    if use_cache and store:
        key = cache_key(fingerprint or model_fingerprint(model), uri, index_sha, image_size, n_last_blocks)
        target = cache_uri(store, key)
        if storage.exists(target):
            data = torch.load(io.BytesIO(storage.get_bytes(target)), map_location="cpu", weights_only=True)
            log.info("features %s: cache hit %s (%d images)", uri, target, len(data["keys"]))
            return FeatureSet.from_payload(data, from_cache=True)
    feats = extract_features(model, uri, image_size, batch_size, n_last_blocks, num_workers)
    feats.index_sha256 = index_sha
    if target is not None:
        buf = io.BytesIO()
        torch.save(feats.to_payload(), buf)
        storage.put_bytes(target, buf.getvalue())
        log.info("features %s: cached at %s", uri, target)
    return feats
