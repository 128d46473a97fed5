"""A dataset's catalogue: the names of its metadata objects, the index schema, and reading and
writing `index.parquet` and `_stats.json`. Below both the shard writer (app/data/shards.py),
which writes them, and the dataset view (app/data/index.py), which reads them."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app import storage

INDEX_NAME = "index.parquet"
STATS_NAME = "_stats.json"

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("offset", pa.int64()),
    ("size", pa.int64()),
    ("sha256", pa.string()),
    ("source", pa.string()),
    ("label", pa.int64()),
    ("label_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def write_index(uri: str, rows: list[dict[str, Any]]) -> None:
    """Write `rows` (dicts with the index columns) as parquet, atomically."""
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.put_bytes(uri, buf.getvalue())


def read_index(dataset_uri: str) -> pa.Table:
    """The index of a dataset as a pyarrow table (`.to_pylist()` for a list of dicts)."""
    uri = storage.join(storage.to_uri(dataset_uri), INDEX_NAME)
    data = storage.get_bytes(uri)
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise storage.StorageError(f"{uri}: not a readable parquet index ({exc})") from None


def read_stats(dataset_uri: str) -> dict[str, Any]:
    """`_stats.json` of a complete dataset; a clear error for one still being written."""
    uri = storage.to_uri(dataset_uri).rstrip("/")
    stats_uri = storage.join(uri, STATS_NAME)
    if not storage.exists(stats_uri):
        raise storage.StorageError(
            f"{uri}: not a complete dataset (no {STATS_NAME}; still being written or its writer "
            "failed)")
    return storage.get_json(stats_uri)
