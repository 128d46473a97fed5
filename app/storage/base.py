"""URI helpers, the backend interface and the errors every backend raises."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Protocol
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line that names the URI."""


class NotFound(StorageError):
    """The object does not exist."""


class RangeNotSatisfiable(StorageError):
    """A byte range lies (partly) past the end of the object: the object is shorter than the
    index that names the range (a truncated shard). A data problem, never retried."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    mtime: float = 0.0


def to_uri(path_or_uri: str) -> str:
    """Turn a plain or relative path into an absolute `file://` URI; leave URIs alone."""
    if "://" in path_or_uri:
        scheme, rest = path_or_uri.split("://", 1)
        if scheme == "file" and not rest.startswith("/"):
            return "file://" + os.path.abspath(rest)
        return path_or_uri
    return "file://" + os.path.abspath(path_or_uri)


def parse_uri(uri: str) -> tuple[str, str, str]:
    """`(scheme, bucket_or_empty, key_or_path)`; file URIs return the absolute path as key."""
    uri = to_uri(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return "file", "", parsed.netloc + parsed.path if parsed.netloc else parsed.path
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: s3 URI has no bucket")
        return "s3", parsed.netloc, parsed.path.lstrip("/")
    raise StorageError(f"{uri}: unsupported URI scheme '{parsed.scheme}' (use file:// or s3://)")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


class Backend(Protocol):
    def put_file(self, uri: str, local_path: str) -> None: ...
    def put_bytes(self, uri: str, data: bytes) -> None: ...
    def put_stream(self, uri: str, stream: BinaryIO, length: int = -1) -> None: ...
    def get_bytes(self, uri: str) -> bytes: ...
    def get_file(self, uri: str, local_path: str) -> None: ...
    def open_read(self, uri: str) -> BinaryIO: ...
    def list_objects(self, prefix_uri: str, recursive: bool = True) -> Iterator[ObjectInfo]: ...
    def exists(self, uri: str) -> bool: ...
    def delete(self, uri: str) -> None: ...
    def delete_prefix(self, prefix_uri: str) -> None: ...
    def copy(self, src_uri: str, dst_uri: str) -> None: ...
