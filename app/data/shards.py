"""WebDataset-style tar shards: the writer that builds a dataset and the streaming reader.

A dataset at `<uri>` (DESIGN.md §3):

    <uri>/shards/shard-000000.tar   <key>.jpg + <key>.json per sample, in key order
    <uri>/index.parquet             one row per sample (see app/data/index.py)
    <uri>/_stats.json               counts, classes, skipped inputs; written last

Each shard is built in a local temp file and uploaded whole with `storage.put_file`, so a reader
never sees half a shard. The index and then `_stats.json` are written only after every shard is in
place: a dataset without `_stats.json` is incomplete. Tar headers carry fixed mtime/uid/gid/mode,
so the same input always gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator

from app import storage
from app.data.catalog import INDEX_NAME, STATS_NAME, read_stats, write_index
from app.data.tarstream import TarFormatError, iter_members

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
FORMAT_VERSION = 1
IMAGE_EXT = "jpg"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_IMAGE_MEMBER_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"}


def shard_name(index: int) -> str:
    """Path of shard `index` relative to the dataset URI."""
    return f"{SHARDS_DIR}/shard-{index:06d}.tar"


def is_valid_key(key: str) -> bool:
    """Keys become tar member stems: no dots or slashes, so `<key>.jpg` splits unambiguously."""
    return bool(_KEY_RE.match(key)) and len(key) <= 200


@dataclass
class Sample:
    key: str
    image_bytes: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> int | None:
        return self.meta.get("label")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Write samples into size-bounded shards, then the index and `_stats.json`.

        with ShardWriter(uri, max_samples_per_shard=1000, created_by="dinoctl data import") as w:
            w.write(key, jpeg_bytes, {"label": 3, "label_name": "dog", "source": "dog/1.jpg"})
            w.skip("dog/2.jpg", "cannot decode (image file is truncated)")

    The dataset is finalized when the block exits cleanly; on an exception nothing after the
    shards already uploaded is written, so the dataset stays visibly incomplete.
    """

    def __init__(self, dataset_uri: str, max_samples_per_shard: int = 1000,
                 max_bytes: int = 256 << 20, created_by: str = "dinoctl",
                 name: str | None = None, extra_stats: dict[str, Any] | None = None):
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.uri = storage.to_uri(dataset_uri).rstrip("/")
        self.max_samples = max_samples_per_shard
        self.max_bytes = max_bytes
        self.created_by = created_by
        self.name = name or self.uri.rsplit("/", 1)[-1]
        self.extra_stats = dict(extra_stats or {})
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self._keys: set[str] = set()
        self._shard_index = 0
        self._shard_bytes = 0
        self._shard_rows: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp_path = ""
        self._total_bytes = 0
        self._started = time.monotonic()
        self._finished = False
        # Overwriting an existing dataset: drop its completion markers first, so that a crash
        # half-way leaves a dataset that reads as incomplete rather than as the old one.
        for marker in (STATS_NAME, INDEX_NAME):
            storage.delete(storage.join(self.uri, marker))

    # -- public -----------------------------------------------------------------------------

    def write(self, key: str, image_bytes: bytes, meta: dict[str, Any] | None = None) -> None:
        """Add one sample. `meta` may hold label, label_name, source, width, height and more."""
        if self._finished:
            raise RuntimeError("ShardWriter already finished")
        if not is_valid_key(key):
            raise ValueError(f"sample key {key!r}: use only letters, digits, '_' and '-'")
        if key in self._keys:
            raise ValueError(f"sample key {key!r}: written twice")
        meta = dict(meta or {})
        label = meta.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise ValueError(f"sample {key}: label must be an int or None, got {label!r}")
        record = {"key": key, "label": label, "label_name": meta.get("label_name"),
                  "source": meta.get("source", "")}
        record.update({k: v for k, v in meta.items() if k not in record})
        meta_bytes = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()

        size = (_member_bytes(f"{key}.{IMAGE_EXT}", len(image_bytes))
                + _member_bytes(f"{key}.json", len(meta_bytes)))
        if self._shard_rows and (len(self._shard_rows) >= self.max_samples
                                 or _tar_file_bytes(self._shard_bytes + size) > self.max_bytes):
            self._flush_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        self._tar.addfile(_tarinfo(f"{key}.{IMAGE_EXT}", len(image_bytes)), io.BytesIO(image_bytes))
        self._tar.addfile(_tarinfo(f"{key}.json", len(meta_bytes)), io.BytesIO(meta_bytes))
        self._keys.add(key)
        self._shard_bytes += size
        self._shard_rows.append({
            "key": key,
            "shard": shard_name(self._shard_index),
            "offset": -1,  # filled in from the tar headers when the shard is closed
            "size": len(image_bytes),
            "sha256": hashlib.sha256(image_bytes).hexdigest(),
            "source": str(record["source"] or ""),
            "label": label,
            "label_name": record["label_name"],
            "width": _int_or_none(meta.get("width")),
            "height": _int_or_none(meta.get("height")),
        })

    def skip(self, source: str, reason: str) -> None:
        """Record an input that was not stored (corrupt, unreadable, not an image)."""
        self.skipped.append({"source": str(source), "reason": str(reason)})
        log.warning("skipped %s: %s", source, reason)

    def close(self) -> dict[str, Any]:
        """Upload the last shard, then the index, then `_stats.json`. Returns the stats."""
        if self._finished:
            raise RuntimeError("ShardWriter already finished")
        if self._shard_rows:
            self._flush_shard()
        self._finished = True
        self._remove_stale_shards()
        write_index(storage.join(self.uri, INDEX_NAME), self.rows)
        stats = self._stats()
        storage.put_json(storage.join(self.uri, STATS_NAME), stats)
        log.info("dataset %s: %d samples in %d shards, %d skipped", self.uri, len(self.rows),
                 self._shard_index, len(self.skipped))
        return stats

    def abort(self) -> None:
        self._finished = True
        self._discard_tmp()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.stats = self.close()
        else:
            self.abort()

    # -- internals --------------------------------------------------------------------------

    def _open_shard(self) -> None:
        fd, self._tmp_path = tempfile.mkstemp(prefix="dinoctl-shard-", suffix=".tar")
        os.close(fd)
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.PAX_FORMAT)

    def _discard_tmp(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp_path:
            try:
                os.unlink(self._tmp_path)
            except FileNotFoundError:
                pass
            self._tmp_path = ""

    def _flush_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        # Byte offsets of each image inside the tar, for ranged reads (`Dataset.get`).
        with tarfile.open(self._tmp_path, "r") as tar:
            offsets = {m.name: m.offset_data for m in tar.getmembers()}
        for row in self._shard_rows:
            row["offset"] = offsets[f"{row['key']}.{IMAGE_EXT}"]
        name = shard_name(self._shard_index)
        size = os.path.getsize(self._tmp_path)
        storage.put_file(storage.join(self.uri, name), self._tmp_path)
        self._discard_tmp()
        self._total_bytes += size
        self.rows.extend(self._shard_rows)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        log.info("wrote %s (%d samples, %.1f MB); %d samples so far, %.0f samples/s", name,
                 len(self._shard_rows), size / 1e6, len(self.rows), len(self.rows) / elapsed)
        self._shard_rows = []
        self._shard_bytes = 0
        self._shard_index += 1

    def _remove_stale_shards(self) -> None:
        keep = {storage.join(self.uri, shard_name(i)) for i in range(self._shard_index)}
        for obj in storage.list_objects(storage.join(self.uri, SHARDS_DIR) + "/"):
            if obj.uri.endswith(".tar") and obj.uri not in keep:
                storage.delete(obj.uri)

    def _stats(self) -> dict[str, Any]:
        classes: dict[int, str] = {}
        per_class: dict[str, int] = {}
        for row in self.rows:
            if row["label"] is not None:
                name = row["label_name"] if row["label_name"] is not None else str(row["label"])
                classes.setdefault(row["label"], name)
                per_class[name] = per_class.get(name, 0) + 1
        n_labelled = sum(per_class.values())
        stats = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "created_by": self.created_by,
            "num_samples": len(self.rows),
            "num_labelled": n_labelled,
            "num_unlabelled": len(self.rows) - n_labelled,
            "num_classes": len(classes),
            "classes": {str(k): classes[k] for k in sorted(classes)},
            "per_class": dict(sorted(per_class.items())),
            "num_shards": self._shard_index,
            "shards": [shard_name(i) for i in range(self._shard_index)],
            "bytes": self._total_bytes,
            "image_bytes": sum(r["size"] for r in self.rows),
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
        }
        stats.update(self.extra_stats)
        return stats


def _member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in the tar: header, data padded to 512, PAX header for long names."""
    pax = 1024 if len(name) > 100 else 0
    return pax + 512 + (size + 511) // 512 * 512


def _tar_file_bytes(member_bytes: int) -> int:
    """File size once closed: two zero blocks end the archive, padded to whole 10 KiB records."""
    total = member_bytes + 1024
    return (total + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` -> (`dir/abc`, `seg.jpg`): split at the first dot of the base name."""
    base = name.rsplit("/", 1)
    stem_dir = base[0] + "/" if len(base) == 2 else ""
    leaf = base[-1]
    if "." not in leaf:
        return stem_dir + leaf, ""
    stem, ext = leaf.split(".", 1)
    return stem_dir + stem, ext.lower()


def iter_tar_samples(fileobj: BinaryIO, source: str = "tar") -> Iterator[Sample]:
    """Stream samples out of a tar read front to back (no seeking, no full download).

    Members with the same key must be adjacent, as WebDataset requires. A key without an image
    member yields a `Sample` with empty `image_bytes` so the caller can count it.
    """
    current_key: str | None = None
    image = b""
    meta: dict[str, Any] = {}
    try:
        for name, data in iter_members(fileobj):
            key, ext = _split_member(name)
            if key != current_key:
                if current_key is not None:
                    yield Sample(current_key, image, meta)
                current_key, image, meta = key, b"", {}
            if ext == "json":
                try:
                    meta.update(json.loads(data))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise storage.StorageError(
                        f"{source}: member {name} is not valid JSON") from None
            elif ext == "cls":
                try:
                    meta.setdefault("label", int(data.strip()))
                except ValueError:
                    raise storage.StorageError(
                        f"{source}: member {name} is not an integer") from None
            elif ext in _IMAGE_MEMBER_EXTS and not image:
                image = data
    except TarFormatError as exc:
        raise storage.StorageError(f"{source}: not a readable tar shard ({exc})") from None
    if current_key is not None:
        yield Sample(current_key, image, meta)


def iter_shard(shard_uri: str) -> Iterator[Sample]:
    """Stream the samples of one shard through `storage.open_read`."""
    with storage.open_read(shard_uri) as f:
        yield from iter_tar_samples(f, source=shard_uri)


def iter_samples(dataset_uri: str, shards: Iterable[str] | None = None) -> Iterator[Sample]:
    """Stream every sample of a dataset (or of the given shards) in shard order.

    `shards` holds shard URIs or names relative to the dataset (`shards/shard-000003.tar`).
    Without it, the shard list comes from `_stats.json`, so the dataset must be complete.
    """
    base = storage.to_uri(dataset_uri).rstrip("/")
    if shards is None:
        shards = read_stats(base).get("shards", [])
    for shard in shards:
        uri = shard if "://" in shard else storage.join(base, shard)
        yield from iter_shard(uri)
