"""`s3://` backend on the minio SDK: atomic puts, streaming resumable reads, retries.

Atomicity: we rely on S3 semantics instead of a temp key + copy. A single PUT creates the object
only when the whole body arrived and its signed SHA-256 matched (over http the SDK signs the
payload hash; over https S3 checks Content-MD5); a multipart upload is invisible until
CompleteMultipartUpload, and the SDK aborts it when a part or the source fails. A process killed
mid-upload leaves at most an incomplete multipart upload, which no GET or LIST shows (a bucket
lifecycle rule `AbortIncompleteMultipartUpload` reclaims its space). A temp key would instead
stay visible after a crash and cost a second full copy on the server.

Processes: a client (its urllib3 connection pool) belongs to the process that made it. A forked
child (DataLoader worker, curation rank, os.fork) that used the parent's pool would share its
sockets and read replies meant for another process, so `S3Backend.client` makes a fresh client
whenever the current pid differs from the one that built it, and an `S3Reader` opened before a
fork reopens its object in the child instead of reading the parent's socket.
"""

from __future__ import annotations

import io
import logging
import os
from typing import BinaryIO, Iterator

from app.storage.base import NotFound, ObjectInfo, RangeNotSatisfiable, StorageError, parse_uri
from app.storage.credentials import S3Settings, load_settings
from app.storage.retry import (BucketMissing, RetryPolicy, SourceError, TransientReply, classify,
                               describe, to_storage_error)

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
        self._pid = os.getpid()
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
        if self._pid != os.getpid():  # a forked child: the open reply is the parent's socket
            self._resp, self._pid = None, os.getpid()
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
        if self._pid != os.getpid():
            self._release()
        budget = self._b.retry.budget()
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
                wait = budget.next_wait() if classify(exc) == "transient" else None
                if wait is None:
                    raise to_storage_error(exc, uri=self._uri, endpoint=self._b.settings.endpoint,
                                           what="read", attempts=budget.attempts) from exc
                self._b.retry.sleep(wait)

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
        import urllib3

        self.settings = settings
        self.retry = retry or RetryPolicy.from_env()
        self.part_size = part_size
        self.parallel_parts = parallel_parts
        self.pool_size = pool_size
        self._client = None
        self._client_pid = 0
        if not settings.verify_tls and settings.secure:
            # The user opted out (S3_VERIFY_TLS=false): say so once, not on every request.
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.warning("S3 TLS certificates are not verified for %s (S3_VERIFY_TLS=false)",
                        settings.endpoint)

    @property
    def client(self):
        """This process's minio client (a new one, with its own sockets, after a fork)."""
        if self._client is None or self._client_pid != os.getpid():
            # The parent's pool is dropped, not closed: its sockets are still the parent's.
            self._client, self._client_pid = self._new_client(), os.getpid()
        return self._client

    def _new_client(self):
        import certifi
        import minio
        import urllib3

        settings = self.settings
        # Our RetryPolicy is the only retry layer: urllib3 must surface every failure at once.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=120),
            maxsize=self.pool_size,
            cert_reqs="CERT_REQUIRED" if settings.verify_tls else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0,
                                  raise_on_redirect=True, raise_on_status=False),
        )
        return minio.Minio(
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
        """Exactly `length` bytes from `offset` (random access into shards), or an error.

        A reply cut short keeps what arrived and the rest is asked for from where it stopped; a
        reply that is not the range asked for (a longer body, another Content-Range: what a
        socket shared by two processes produces) is dropped with its connection and asked again.
        A range past the end of the object is `RangeNotSatisfiable` (the data is shorter than
        its index says), never retried.
        """
        bucket, key = _split(uri)
        if length <= 0:
            return b""
        out = bytearray()
        budget = self.retry.budget()
        while len(out) < length:
            start, want = offset + len(out), length - len(out)
            got = len(out)
            try:
                self._read_range_into(out, bucket, key, start, want, uri)
                if len(out) == got:
                    raise TransientReply(f"an empty reply for bytes {start}+{want}")
            except RangeNotSatisfiable:
                raise
            except Exception as exc:
                if len(out) > got:  # a piece arrived before the reply broke: a fresh budget
                    budget.progress()
                if getattr(exc, "code", None) == "InvalidRange":
                    raise RangeNotSatisfiable(
                        f"{uri}: range {offset}+{length} is past the end of the object") from None
                wait = budget.next_wait() if classify(exc) == "transient" else None
                if wait is None:
                    raise to_storage_error(exc, uri=uri, endpoint=self.settings.endpoint,
                                           what=f"read of range {offset}+{length}",
                                           attempts=budget.attempts,
                                           source=self.settings.source) from exc
                log.warning("%s: ranged read at byte %d failed (%s); retry %d in %.2f s", uri,
                            start, describe(exc), budget.attempts - 1, wait)
                self.retry.sleep(wait)
        return bytes(out)

    def _read_range_into(self, out: bytearray, bucket: str, key: str, start: int, want: int,
                         uri: str) -> None:
        """Append the bytes of one ranged GET to `out`. A reply cut short keeps what arrived;
        a reply that is not the range asked for raises `TransientReply` and adds nothing."""
        before = len(out)
        resp = self.client.get_object(bucket, key, offset=start, length=want)
        healthy = False
        try:
            declared = _content_range(resp.headers.get("Content-Range", ""))
            if declared is not None and declared[0] == start and 0 <= declared[2] < start + want:
                raise RangeNotSatisfiable(
                    f"{uri}: object is {declared[2]} bytes, shorter than the range "
                    f"{start}+{want} its index names")
            length = resp.headers.get("Content-Length")
            if (declared is not None and declared[:2] != (start, start + want - 1)) or \
                    (length is not None and int(length) != want):
                raise TransientReply(f"asked for bytes {start}+{want}, the reply is Content-Range "
                                     f"{resp.headers.get('Content-Range')!r}, Content-Length {length}")
            while True:  # read1: what arrived before a break is kept, the rest asked for again
                chunk = resp.read1(256 * 1024)
                if not chunk:
                    break
                if len(out) - before + len(chunk) > want:
                    raise TransientReply(f"asked for {want} bytes at {start}, the reply has more")
                out += chunk
            healthy = True
        except TransientReply:
            del out[before:]  # none of a wrong reply's bytes can be trusted
            raise
        finally:
            resp.close()  # a damaged reply's connection is never reused
            if healthy:
                resp.release_conn()

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
        budget = self.retry.budget()
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
                    budget.progress()
                return
            except Exception as exc:
                # A page failed: continue after the last key we yielded (no duplicates, no gaps).
                wait = budget.next_wait() if classify(exc) == "transient" else None
                if wait is None:
                    raise to_storage_error(exc, uri=prefix_uri, endpoint=self.settings.endpoint,
                                           what="list", attempts=budget.attempts,
                                           source=self.settings.source) from exc
                self.retry.sleep(wait)

    def _has_any(self, bucket: str, prefix: str, uri: str) -> bool:
        def probe() -> bool:
            return next(iter(self.client.list_objects(bucket, prefix=prefix)), None) is not None

        return self.call(probe, uri, "list")

    # -- delete / copy -------------------------------------------------------------------------

    def delete(self, uri: str) -> None:
        bucket, key = _split(uri)
        self.call(lambda: self.client.remove_object(bucket, key), uri, "delete")

    def delete_prefix(self, prefix_uri: str) -> None:
        """Delete every object under `prefix_uri/` (S3 has no directories to remove)."""
        for obj in list(self.list_objects(prefix_uri.rstrip("/") + "/")):
            if not obj.uri.endswith("/"):
                self.delete(obj.uri)

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


def _content_range(value: str) -> tuple[int, int, int] | None:
    """`bytes a-b/total` -> (a, b, total); None when absent or unparseable (total `*` -> -1)."""
    if not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, last = span.partition("-")
    try:
        return int(first), int(last), int(total) if total.strip() != "*" else -1
    except ValueError:
        return None


def _copy(src: BinaryIO, dst: BinaryIO, chunk: int = 4 * MiB) -> None:
    while True:
        block = src.read(chunk)
        if not block:
            return
        dst.write(block)
