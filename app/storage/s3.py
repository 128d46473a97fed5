"""`s3://` backend on the minio SDK: atomic puts, streaming resumable reads, retries.

Atomicity: we rely on S3 semantics instead of a temp key + copy. A single PUT creates the object
only when the whole body arrived and its signed SHA-256 matched (over http the SDK signs the
payload hash; over https S3 checks Content-MD5); a multipart upload is invisible until
CompleteMultipartUpload, and the SDK aborts it when a part or the source fails. A process killed
mid-upload leaves at most an incomplete multipart upload, which no GET or LIST shows (a bucket
lifecycle rule `AbortIncompleteMultipartUpload` reclaims its space). A temp key would instead
stay visible after a crash and cost a second full copy on the server.
"""

from __future__ import annotations

import io
import logging
import os
from typing import BinaryIO, Iterator

from app.storage.base import NotFound, ObjectInfo, StorageError, parse_uri
from app.storage.credentials import S3Settings, load_settings
from app.storage.retry import BucketMissing, RetryPolicy, SourceError, classify, to_storage_error

log = logging.getLogger(__name__)
MiB = 1 << 20
MAX_COPY_SIZE = 5 * 1024 * MiB  # a single server-side CopyObject; larger sources use compose


def _split(uri: str) -> tuple[str, str]:
    scheme, bucket, key = parse_uri(uri)
    if scheme != "s3":
        raise StorageError(f"{uri}: not an s3:// URI")
    return bucket, key


class _GuardedSource(io.RawIOBase):
    """Wrap the caller's stream so its failures are told apart from network failures."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except Exception as exc:
            raise SourceError(exc) from exc


class S3Reader(io.RawIOBase):
    """A seekable reader over one object that streams the HTTP body in chunks.

    A transient failure mid-body reopens the object at the current offset with a Range request
    (and `If-Match` on the first ETag, so a concurrently replaced object is an error, not a mix).
    """

    def __init__(self, backend: S3Backend, uri: str):
        self._b, self._uri = backend, uri
        self._bucket, self._key = _split(uri)
        self._pos = 0
        self._resp = None
        self._etag: str | None = None
        self._size = 0
        self._open_at(0)

    def _open_at(self, pos: int) -> None:
        headers = {"If-Match": self._etag} if self._etag else None

        def get():
            return self._b.client.get_object(self._bucket, self._key, offset=pos,
                                             request_headers=headers)

        resp = self._b.call(get, self._uri, "get")
        if self._etag is None:
            self._etag = resp.headers.get("ETag")
            self._size = int(resp.headers.get("Content-Length", 0))
        self._resp = resp

    def _release(self) -> None:
        if self._resp is not None:
            resp, self._resp = self._resp, None
            try:
                resp.close()
            finally:
                resp.release_conn()

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        new = max(0, base + offset)
        if new != self._pos:
            self._release()  # reopened lazily at the new offset by the next read
            self._pos = new
        return self._pos

    def readinto(self, buf) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if self._pos >= self._size or len(buf) == 0:
            return 0
        attempt = 0
        while True:
            try:
                if self._resp is None:
                    self._open_at(self._pos)
                n = self._resp.readinto(buf)
                if n == 0:  # the body ended before Content-Length: a truncated response
                    raise ConnectionResetError(f"body ended at byte {self._pos} of {self._size}")
                self._pos += n
                return n
            except StorageError:
                raise
            except Exception as exc:
                self._release()
                policy = self._b.retry
                if classify(exc) != "transient" or attempt >= policy.max_retries:
                    raise to_storage_error(exc, uri=self._uri, endpoint=self._b.settings.endpoint,
                                           what="read", attempts=attempt + 1) from exc
                policy.sleep(policy.delay(attempt))
                attempt += 1

    def readall(self) -> bytes:
        out = bytearray()
        buf = bytearray(4 * MiB)
        while True:
            n = self.readinto(buf)
            if not n:
                return bytes(out)
            out += buf[:n]

    def close(self) -> None:
        if not self.closed:
            self._release()
        super().close()


class S3Backend:
    """Implements `app.storage.base.Backend` for `s3://bucket/key` URIs."""

    def __init__(self, settings: S3Settings, retry: RetryPolicy | None = None,
                 part_size: int = 16 * MiB, parallel_parts: int = 3, pool_size: int = 32):
        import certifi
        import minio
        import urllib3

        self.settings = settings
        self.retry = retry or RetryPolicy.from_env()
        self.part_size = part_size
        self.parallel_parts = parallel_parts
        if not settings.verify_tls and settings.secure:
            # The user opted out (S3_VERIFY_TLS=false): say so once, not on every request.
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.warning("S3 TLS certificates are not verified for %s (S3_VERIFY_TLS=false)",
                        settings.endpoint)
        # Our RetryPolicy is the only retry layer: urllib3 must surface every failure at once.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=120),
            maxsize=pool_size,
            cert_reqs="CERT_REQUIRED" if settings.verify_tls else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0,
                                  raise_on_redirect=True, raise_on_status=False),
        )
        self.client = minio.Minio(
            settings.host, access_key=settings.access_key, secret_key=settings.secret_key,
            secure=settings.secure, region=settings.region, http_client=http,
            cert_check=settings.verify_tls,
        )

    @classmethod
    def from_env(cls) -> S3Backend:
        part_mb = os.environ.get("S3_PART_SIZE_MB", "").strip()
        kwargs = {"part_size": int(part_mb) * MiB} if part_mb else {}
        return cls(load_settings(), **kwargs)

    def __repr__(self) -> str:
        return f"S3Backend({self.settings!r})"

    def call(self, fn, uri: str, what: str):
        return self.retry.call(fn, uri=uri, endpoint=self.settings.endpoint, what=what,
                               source=self.settings.source)

    # -- writes --------------------------------------------------------------------------------

    def _write(self, uri: str, upload) -> None:
        """Run `upload()` with retries; create the bucket first if allowed and it is missing."""
        try:
            self.call(upload, uri, "put")
        except BucketMissing:
            if not self.settings.create_bucket:
                raise
            bucket, _ = _split(uri)
            self._make_bucket(bucket, uri)
            self.call(upload, uri, "put")

    def _make_bucket(self, bucket: str, uri: str) -> None:
        from minio.error import S3Error

        def make():
            try:
                self.client.make_bucket(bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self.call(make, uri, "create bucket")

    def _put(self, uri: str, stream: BinaryIO, length: int) -> None:
        bucket, key = _split(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{uri}: an object URI needs a key that does not end with '/'")
        part_size = self.part_size if length < 0 or length > self.part_size else 0
        self.client.put_object(bucket, key, _GuardedSource(stream), length,
                               part_size=part_size, num_parallel_uploads=self.parallel_parts)

    def put_bytes(self, uri: str, data: bytes) -> None:
        data = bytes(data)
        self._write(uri, lambda: self._put(uri, io.BytesIO(data), len(data)))

    def put_file(self, uri: str, local_path: str) -> None:
        if not os.path.isfile(local_path):
            raise StorageError(f"{local_path}: no such file to upload to {uri}")

        def upload():
            # Reopened on every attempt, so a retry starts from byte 0.
            with open(local_path, "rb") as f:
                self._put(uri, f, os.fstat(f.fileno()).st_size)

        self._write(uri, upload)

    def put_stream(self, uri: str, stream: BinaryIO, length: int = -1) -> None:
        """Upload from a stream. Retried only if the stream can seek back to where it started."""
        start = stream.tell() if stream.seekable() else None

        def upload():
            if start is not None:
                stream.seek(start)
            self._put(uri, stream, length)

        if start is None:
            try:
                upload()
            except Exception as exc:
                raise to_storage_error(exc, uri=uri, endpoint=self.settings.endpoint, what="put",
                                       source=self.settings.source) from exc
        else:
            self._write(uri, upload)

    # -- reads ---------------------------------------------------------------------------------

    def open_read(self, uri: str) -> BinaryIO:
        return io.BufferedReader(S3Reader(self, uri), buffer_size=MiB)

    def get_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def get_range(self, uri: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` in one ranged GET (random access into shards)."""
        bucket, key = _split(uri)

        def get():
            resp = self.client.get_object(bucket, key, offset=offset, length=length)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        data = self.call(get, uri, "get")
        if len(data) != length:
            raise StorageError(f"{uri}: range {offset}+{length} returned {len(data)} bytes")
        return data

    def get_file(self, uri: str, local_path: str) -> None:
        from app.storage.local import _atomic_write

        with self.open_read(uri) as src:
            _atomic_write(local_path, lambda f: _copy(src, f))

    def exists(self, uri: str) -> bool:
        bucket, key = _split(uri)
        if not key:
            return False
        try:
            self.call(lambda: self.client.stat_object(bucket, key), uri, "stat")
            return True
        except NotFound:
            return False

    def stat(self, uri: str) -> ObjectInfo:
        bucket, key = _split(uri)
        st = self.call(lambda: self.client.stat_object(bucket, key), uri, "stat")
        mtime = st.last_modified.timestamp() if st.last_modified else 0.0
        return ObjectInfo(uri, int(st.size or 0), mtime)

    def list_objects(self, prefix_uri: str, recursive: bool = True) -> Iterator[ObjectInfo]:
        bucket, prefix = _split(prefix_uri)
        # Like the file backend: a prefix naming a "directory" lists inside it ("a/b" means "a/b/",
        # not also "a/bc").
        if prefix and not prefix.endswith("/") and self._has_any(bucket, prefix + "/", prefix_uri):
            prefix += "/"
        after: str | None = None
        seen_dirs: set[str] = set()
        attempt = 0
        while True:
            try:
                for obj in self.client.list_objects(bucket, prefix=prefix, recursive=recursive,
                                                    start_after=after):
                    name = obj.object_name
                    if obj.is_dir:
                        if name not in seen_dirs:
                            seen_dirs.add(name)
                            yield ObjectInfo(f"s3://{bucket}/{name}", 0, 0.0)
                    else:
                        mtime = obj.last_modified.timestamp() if obj.last_modified else 0.0
                        yield ObjectInfo(f"s3://{bucket}/{name}", int(obj.size or 0), mtime)
                    after = name
                    attempt = 0
                return
            except Exception as exc:
                # A page failed: continue after the last key we yielded (no duplicates, no gaps).
                if classify(exc) != "transient" or attempt >= self.retry.max_retries:
                    raise to_storage_error(exc, uri=prefix_uri, endpoint=self.settings.endpoint,
                                           what="list", attempts=attempt + 1,
                                           source=self.settings.source) from exc
                self.retry.sleep(self.retry.delay(attempt))
                attempt += 1

    def _has_any(self, bucket: str, prefix: str, uri: str) -> bool:
        def probe() -> bool:
            return next(iter(self.client.list_objects(bucket, prefix=prefix)), None) is not None

        return self.call(probe, uri, "list")

    # -- delete / copy -------------------------------------------------------------------------

    def delete(self, uri: str) -> None:
        bucket, key = _split(uri)
        self.call(lambda: self.client.remove_object(bucket, key), uri, "delete")

    def copy(self, src_uri: str, dst_uri: str) -> None:
        """Server-side copy (no bytes pass through this process); compose above 5 GiB."""
        from minio.commonconfig import ComposeSource, CopySource

        src_bucket, src_key = _split(src_uri)
        dst_bucket, dst_key = _split(dst_uri)
        size = self.stat(src_uri).size

        def do_copy():
            if size <= MAX_COPY_SIZE:
                self.client.copy_object(dst_bucket, dst_key, CopySource(src_bucket, src_key))
            else:
                self.client.compose_object(dst_bucket, dst_key, [ComposeSource(src_bucket, src_key)])

        self._write(dst_uri, do_copy)


def _copy(src: BinaryIO, dst: BinaryIO, chunk: int = 4 * MiB) -> None:
    while True:
        block = src.read(chunk)
        if not block:
            return
        dst.write(block)
