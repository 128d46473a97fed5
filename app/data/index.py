"""The dataset index (`index.parquet`) and the `Dataset` view over a complete dataset.

Index columns, one row per sample in shard order:

    key         str    sample key (tar members `<key>.jpg`, `<key>.json`)
    shard       str    shard path relative to the dataset URI, e.g. `shards/shard-000000.tar`
    offset      int64  byte offset of the JPEG data inside the shard (for ranged reads)
    size        int64  JPEG size in bytes
    sha256      str    hex digest of the JPEG bytes (exact-duplicate checks, integrity)
    source      str    where the sample came from (input path, synth split, ...)
    label       int64  class index, null for unlabelled samples
    label_name  str    class name, null for unlabelled samples
    width       int32  image width in pixels (null if unknown)
    height      int32  image height in pixels (null if unknown)
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any, BinaryIO, Iterator

from app import storage
from app.data.catalog import INDEX_SCHEMA, read_index, read_stats, write_index
from app.data.shards import Sample, iter_samples

__all__ = ["INDEX_SCHEMA", "CorruptSample", "Dataset", "read_index", "read_stats", "shards_for_rank",
           "write_index"]


class CorruptSample(storage.StorageError):
    """A sample's stored bytes are not what the index recorded (sha256 mismatch, or the shard is
    shorter than the index says). The message names the sample and the shard."""


def shards_for_rank(shard_uris: list[str], rank: int, world_size: int) -> list[str]:
    """The shards rank `rank` of `world_size` reads: round-robin, disjoint, covering all shards.

    With more ranks than shards some ranks get none; write more, smaller shards for wide jobs.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(shard_uris[rank::world_size])


class _RangeReader:
    """Byte ranges of shard objects through a few open readers kept between calls.

    `Dataset.get` in a loader reads many samples of the same shard; reopening the object each
    time costs a request on S3. Readers are per process (a forked DataLoader worker opens its
    own) and are dropped when the owner is pickled.
    """

    def __init__(self, max_open: int = 4):
        self.max_open = max_open
        self._pid = os.getpid()
        self._open: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, uri: str, offset: int, size: int) -> bytes:
        backend = storage.get_storage(uri)
        if hasattr(backend, "get_range"):  # a backend may serve byte ranges natively
            return backend.get_range(storage.to_uri(uri), offset, size)
        if self._pid != os.getpid():
            self._open = OrderedDict()  # the parent's handles stay the parent's
            self._pid = os.getpid()
        f = self._open.pop(uri, None)
        if f is None:
            f = storage.open_read(uri)
        if not f.seekable():
            f.close()
            return _read_range_streaming(uri, offset, size)
        self._open[uri] = f
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            self._open.pop(uri).close()
            raise storage.RangeNotSatisfiable(
                f"{uri}: short read at offset {offset} ({len(data)}/{size} bytes)")
        return data

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def _read_range_streaming(uri: str, offset: int, size: int) -> bytes:
    with storage.open_read(uri) as f:
        remaining = offset
        while remaining:  # a plain stream: read and drop the bytes before the image
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        data = f.read(size)
    if len(data) != size:
        raise storage.RangeNotSatisfiable(
            f"{uri}: short read at offset {offset} ({len(data)}/{size} bytes)")
    return data


class Dataset:
    """A complete dataset: its index, stats and shards.

    Raises `StorageError` when `_stats.json` is missing (a dataset still being written, or one
    whose writer crashed).
    """

    def __init__(self, uri: str):
        self.uri = storage.to_uri(uri).rstrip("/")
        self.stats: dict[str, Any] = read_stats(self.uri)
        self.index = read_index(self.uri)
        self._rows: list[dict[str, Any]] | None = None
        self._reader = _RangeReader()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # open readers do not cross process boundaries
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reader = _RangeReader()

    def close(self) -> None:
        """Close the shard readers `get` keeps open (also done when the Dataset is collected)."""
        self._reader.close()

    def __len__(self) -> int:
        return self.index.num_rows

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = self.index.to_pylist()
        return self._rows

    @property
    def keys(self) -> list[str]:
        return self.index.column("key").to_pylist()

    @property
    def labels(self) -> list[int | None]:
        return self.index.column("label").to_pylist()

    @property
    def classes(self) -> list[str]:
        """Class names by label index (empty for an unlabelled dataset)."""
        names = self.stats.get("classes", {})
        if not names:
            return []
        out = [""] * (max(int(k) for k in names) + 1)
        for k, v in names.items():
            out[int(k)] = v
        return out

    @property
    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s) for s in self.stats.get("shards", [])]

    def shards_for_rank(self, rank: int, world_size: int) -> list[str]:
        return shards_for_rank(self.shard_uris, rank, world_size)

    def iter_samples(self, rank: int = 0, world_size: int = 1) -> Iterator[Sample]:
        """Stream this rank's samples (all of them with the defaults)."""
        return iter_samples(self.uri, self.shards_for_rank(rank, world_size))

    def get(self, i: int, verify: bool = True) -> Sample:
        """Random access to sample `i` through its byte offset in the shard.

        With `verify` the bytes are checked against the index's sha256: a shard altered or
        truncated after indexing raises `CorruptSample` naming the sample, so a reader can skip
        and count it instead of training on garbage.
        """
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        row = self.rows[i]
        shard_uri = storage.join(self.uri, row["shard"])
        try:
            data = self._reader.read(shard_uri, row["offset"], row["size"])
        except storage.RangeNotSatisfiable as exc:
            raise CorruptSample(f"sample {row['key']}: {exc}") from None
        if verify and row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise CorruptSample(f"sample {row['key']}: {shard_uri} bytes {row['offset']}+"
                                f"{row['size']} do not match the index's sha256 (the shard was "
                                "changed after indexing)")
        meta = {k: row[k] for k in ("label", "label_name", "source", "width", "height")}
        meta["key"] = row["key"]
        return Sample(row["key"], data, meta)
