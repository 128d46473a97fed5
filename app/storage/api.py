"""Module-level functions that dispatch on the URI scheme."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, BinaryIO, Iterator

from app.storage.base import Backend, ObjectInfo, StorageError, parse_uri, to_uri
from app.storage.local import LocalBackend

_local = LocalBackend()
_s3_backends: dict[str, Backend] = {}
_S3_ENV = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_CREDENTIALS_DIR",
           "S3_VERIFY_TLS", "S3_CREATE_BUCKET", "S3_MAX_RETRIES", "S3_RETRY_BASE_SECONDS",
           "S3_PART_SIZE_MB", "AWS_REGION", "AWS_DEFAULT_REGION")


def get_storage(uri: str) -> Backend:
    scheme, _, _ = parse_uri(uri)
    if scheme == "file":
        return _local
    from app.storage.s3 import S3Backend  # imported lazily: the minio SDK is only needed for s3://

    # One client per distinct S3 environment (tests and tools switch endpoints and keys).
    key = "\0".join(os.environ.get(name, "") for name in _S3_ENV)
    if key not in _s3_backends:
        _s3_backends[key] = S3Backend.from_env()
    return _s3_backends[key]


def put_bytes(uri: str, data: bytes) -> None:
    get_storage(uri).put_bytes(to_uri(uri), data)


def put_file(uri: str, local_path: str) -> None:
    get_storage(uri).put_file(to_uri(uri), local_path)


def put_stream(uri: str, stream: BinaryIO, length: int = -1) -> None:
    """Upload from a readable stream; the object appears only if the whole stream was read."""
    get_storage(uri).put_stream(to_uri(uri), stream, length)


def put_json(uri: str, obj: Any) -> None:
    put_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def get_bytes(uri: str) -> bytes:
    return get_storage(uri).get_bytes(to_uri(uri))


def get_json(uri: str) -> Any:
    data = get_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def get_file(uri: str, local_path: str) -> None:
    get_storage(uri).get_file(to_uri(uri), local_path)


def open_read(uri: str) -> BinaryIO:
    """A streaming, file-like reader (the whole object is not fetched first)."""
    return get_storage(uri).open_read(to_uri(uri))


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """Write through a local temp file; the object appears only when the block exits cleanly."""
    fd, tmp = tempfile.mkstemp(prefix="dinoctl-write-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        put_file(uri, tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def list_objects(prefix_uri: str, recursive: bool = True) -> list[ObjectInfo]:
    return list(get_storage(prefix_uri).list_objects(to_uri(prefix_uri), recursive=recursive))


def exists(uri: str) -> bool:
    return get_storage(uri).exists(to_uri(uri))


def delete(uri: str) -> None:
    get_storage(uri).delete(to_uri(uri))


def delete_prefix(prefix_uri: str) -> None:
    """Delete everything under `prefix_uri` (on file:// the directory too)."""
    get_storage(prefix_uri).delete_prefix(to_uri(prefix_uri))


def copy(src_uri: str, dst_uri: str) -> None:
    src, dst = to_uri(src_uri), to_uri(dst_uri)
    if parse_uri(src)[0] == parse_uri(dst)[0]:
        get_storage(src).copy(src, dst)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "obj")
        get_file(src, local)
        put_file(dst, local)
