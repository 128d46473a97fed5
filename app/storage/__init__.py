"""One storage interface over `file://` and `s3://` URIs.

Every stage reads and writes through these functions; none of them knows which backend is behind
a URI. Writes are atomic: a reader sees either the old object or the whole new one.

    from app import storage
    storage.put_bytes("s3://bucket/runs/x/summary.json", data)
    with storage.open_read("file:///data/shard-000000.tar") as f: ...
"""

from app.storage.base import (ObjectInfo, StorageError, NotFound, RangeNotSatisfiable, join,
                              parse_uri, to_uri)
from app.storage.api import (
    copy,
    delete,
    delete_prefix,
    exists,
    get_bytes,
    get_file,
    get_storage,
    list_objects,
    open_read,
    open_write,
    put_bytes,
    put_file,
    put_json,
    put_stream,
    get_json,
)

__all__ = [
    "ObjectInfo", "StorageError", "NotFound", "RangeNotSatisfiable", "join", "parse_uri", "to_uri",
    "copy", "delete", "delete_prefix",
    "exists", "get_bytes", "get_file", "get_storage", "list_objects", "open_read", "open_write",
    "put_bytes", "put_file", "put_json", "put_stream", "get_json",
]
