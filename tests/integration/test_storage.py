"""app.storage against the local file system and a real S3 server (SeaweedFS, SigV4 auth)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from app import storage
from app.storage import NotFound, StorageError
from tests.services import seaweedfs

pytestmark = pytest.mark.slow


@pytest.fixture(params=["file", "s3"])
def base(request, tmp_path):
    """A fresh, empty prefix on each backend."""
    if request.param == "file":
        return storage.to_uri(str(tmp_path / "store"))
    request.getfixturevalue("s3_env")
    return request.getfixturevalue("s3_server").uri()


class FailingSource(io.RawIOBase):
    """Yields `fail_after` bytes of data, then raises like a disk or network error would."""

    def __init__(self, fail_after: int):
        self.left = fail_after

    def readable(self):
        return True

    def readinto(self, buf):
        if self.left <= 0:
            raise OSError("source went away")
        n = min(len(buf), self.left)
        buf[:n] = b"x" * n
        self.left -= n
        return n


def test_small_object_round_trip_and_missing_object(base):
    uri = storage.join(base, "a", "hello.txt")
    storage.put_bytes(uri, b"hello")
    assert storage.get_bytes(uri) == b"hello"
    assert storage.exists(uri)
    storage.put_json(storage.join(base, "a", "x.json"), {"k": [1, 2]})
    assert storage.get_json(storage.join(base, "a", "x.json")) == {"k": [1, 2]}
    with pytest.raises(NotFound, match="no such object") as err:
        storage.get_bytes(storage.join(base, "a", "missing"))
    assert "\n" not in str(err.value) and "missing" in str(err.value)
    assert not storage.exists(storage.join(base, "a", "missing"))
    storage.delete(uri)
    assert not storage.exists(uri)


def test_50mb_file_round_trip_and_streaming_read(base, tmp_path):
    data = os.urandom(50 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = storage.join(base, "big.bin")
    storage.put_file(uri, str(src))
    if uri.startswith("s3://"):
        # 50 MB is above the 16 MiB part size: this went through a multipart upload.
        backend = storage.get_storage(uri)
        bucket, key = uri[5:].split("/", 1)
        assert "-" in backend.client.stat_object(bucket, key).etag
    digest = hashlib.sha256()
    reads = 0
    with storage.open_read(uri) as f:
        while block := f.read(1 << 20):
            digest.update(block)
            reads += 1
        # Seeking re-reads from an offset (Range request on S3).
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
    assert reads >= 50 and digest.hexdigest() == hashlib.sha256(data).hexdigest()
    out = tmp_path / "down.bin"
    storage.get_file(uri, str(out))
    assert out.read_bytes() == data


def test_streaming_read_does_not_fetch_whole_object_first(s3_env, s3_server):
    uri = s3_server.uri("stream.bin")
    storage.put_bytes(uri, os.urandom(8 * 1024 * 1024))
    with storage.open_read(uri) as f:
        first = f.read(100)
        raw = f.raw
        # Only the reader's buffer has been pulled from the socket so far, not 8 MiB.
        assert raw.tell() <= 1 << 20
    assert len(first) == 100


def test_thousand_small_objects_and_prefix_listing(base):
    def put(i):
        storage.put_bytes(storage.join(base, "many", f"obj-{i:04d}"), str(i).encode())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(1000)))
    storage.put_bytes(storage.join(base, "many-other", "x"), b"x")
    storage.put_bytes(storage.join(base, "many", "sub", "y"), b"y")

    listed = storage.list_objects(storage.join(base, "many"))
    names = [o.uri.rsplit("/", 1)[1] for o in listed]
    assert len(listed) == 1001 and names[0] == "obj-0000" and "x" not in names
    assert sorted(o.uri for o in listed) == [o.uri for o in listed]
    assert sum(o.size for o in listed) == sum(len(str(i)) for i in range(1000)) + 1

    top = storage.list_objects(storage.join(base, "many"), recursive=False)
    assert [o.uri for o in top if o.uri.endswith("/")] == [storage.join(base, "many", "sub") + "/"]
    assert len(top) == 1001
    # A prefix that is not a directory matches names, as on S3.
    assert len(storage.list_objects(storage.join(base, "many", "obj-09"))) == 100
    assert storage.get_bytes(storage.join(base, "many", "obj-0999")) == b"999"


def test_copy_and_cross_backend_copy(base, tmp_path, s3_env):
    src = storage.join(base, "c", "src.bin")
    storage.put_bytes(src, b"payload")
    storage.copy(src, storage.join(base, "c", "dst.bin"))
    assert storage.get_bytes(storage.join(base, "c", "dst.bin")) == b"payload"
    other = s3_env.uri("x.bin") if base.startswith("file://") else storage.to_uri(str(tmp_path / "x.bin"))
    storage.copy(src, other)
    assert storage.get_bytes(other) == b"payload"
    with pytest.raises(NotFound):
        storage.copy(storage.join(base, "c", "nope"), storage.join(base, "c", "d2"))


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 40 * 1024 * 1024], ids=["single-put", "multipart"])
def test_interrupted_put_leaves_no_object(base, size):
    uri = storage.join(base, "partial.bin")
    with pytest.raises(StorageError if base.startswith("s3://") else OSError):
        storage.put_stream(uri, io.BufferedReader(FailingSource(size // 2)), size)
    assert not storage.exists(uri)
    assert storage.list_objects(base) == []
    # An existing object is untouched by a failed overwrite.
    storage.put_bytes(uri, b"old")
    with pytest.raises((StorageError, OSError)):
        storage.put_stream(uri, io.BufferedReader(FailingSource(size // 2)), size)
    assert storage.get_bytes(uri) == b"old"


def test_open_write_that_raises_writes_nothing(base):
    uri = storage.join(base, "w.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(b"half")
            raise RuntimeError("stage crashed")
    assert not storage.exists(uri)


_KILLED_UPLOADER = """
import os, sys
from app.storage.s3 import S3Backend, MiB
b = S3Backend.from_env()
b.part_size = 5 * MiB
b.parallel_parts = 1
b.put_stream(sys.argv[1], sys.stdin.buffer, -1)
"""


def test_multipart_upload_killed_midway_is_invisible(s3_env, s3_server):
    uri = s3_server.uri("killed.bin")
    bucket, key = uri[5:].split("/", 1)
    env = {**os.environ, **s3_server.env, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOADER, uri], stdin=subprocess.PIPE,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    client = s3_server.client()
    try:
        # The pipe holds 64 KiB, so once 12 MiB are written the child has read two 5 MiB parts.
        proc.stdin.write(os.urandom(12 * 1024 * 1024))
        proc.stdin.flush()
        uploads = []
        for _ in range(300):  # wait (bounded) until the server has the upload in progress
            uploads = list(client._list_multipart_uploads(bucket, prefix=key).uploads)
            if uploads:
                break
            threading.Event().wait(0.05)
        assert uploads, "the child never started a multipart upload"
    finally:
        proc.kill()
        proc.wait()
    assert not storage.exists(uri)
    assert storage.list_objects(uri) == []
    with pytest.raises(NotFound):
        storage.get_bytes(uri)


def test_wrong_secret_is_a_one_line_auth_error(s3_env, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    uri = s3_server.uri("auth.bin")
    for op in (lambda: storage.put_bytes(uri, b"x"), lambda: storage.get_bytes(uri),
               lambda: storage.list_objects(uri)):
        with pytest.raises(StorageError) as err:
            op()
        msg = str(err.value)
        assert "\n" not in msg and "not-the-secret" not in msg
        assert msg.startswith(f"{uri}: access denied by {s3_server.endpoint}")
        assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in msg


def test_credentials_from_mounted_secret_dir(s3_env, s3_server, monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "accessKey").write_text(s3_server.access_key + "\n")
    (secret / "secretKey").write_text(s3_server.secret_key + "\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("S3_CREDENTIALS_DIR", str(secret))
    uri = s3_server.uri("k.bin")
    storage.put_bytes(uri, b"via secret")
    assert storage.get_bytes(uri) == b"via secret"
    assert s3_server.secret_key not in repr(storage.get_storage(uri))


def test_missing_bucket_is_an_error_unless_create_bucket(s3_env, monkeypatch):
    uri = f"s3://auto-{uuid.uuid4().hex[:8]}/x.bin"
    with pytest.raises(StorageError, match="does not exist.*S3_CREATE_BUCKET=1"):
        storage.put_bytes(uri, b"x")
    monkeypatch.setenv("S3_CREATE_BUCKET", "1")
    storage.put_bytes(uri, b"x")
    assert storage.get_bytes(uri) == b"x"


@pytest.fixture
def private_s3(tmp_path, monkeypatch):
    """A server of our own that this test may stop and restart."""
    with seaweedfs(tmp_path / "weed", bucket="retry") as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        yield server


def test_operation_survives_server_restart_within_retry_window(private_s3, monkeypatch):
    monkeypatch.setenv("S3_MAX_RETRIES", "8")
    monkeypatch.setenv("S3_RETRY_BASE_SECONDS", "0.2")
    uri = private_s3.uri("r.bin")
    storage.put_bytes(uri, b"before")
    retried = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            if "retry" in record.getMessage():
                retried.set()

    handler = Seen()
    logging.getLogger("app.storage.retry").addHandler(handler)
    try:
        private_s3.stop(kill=True)
        result = {}

        def put_then_get():
            try:
                storage.put_bytes(uri, b"after")
                result["data"] = storage.get_bytes(uri)
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        worker = threading.Thread(target=put_then_get)
        worker.start()
        assert retried.wait(30), "no retry was logged while the server was down"
        private_s3.start()
        worker.join(120)
    finally:
        logging.getLogger("app.storage.retry").removeHandler(handler)
    assert result == {"data": b"after"}


def test_server_down_past_retries_is_a_clear_error(private_s3, monkeypatch):
    monkeypatch.setenv("S3_MAX_RETRIES", "2")
    monkeypatch.setenv("S3_RETRY_BASE_SECONDS", "0.01")
    uri = private_s3.uri("down.bin")
    private_s3.stop(kill=True)
    with pytest.raises(StorageError) as err:
        storage.get_bytes(uri)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == f"{uri}: get failed after 3 attempts against {private_s3.endpoint} (connection refused)"


def test_storage_cli_round_trip_through_s3(s3_env, s3_server, tmp_path, capsys):
    from app.cli import main

    src = tmp_path / "dir"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    dst = s3_server.uri("copied")
    assert main(["storage", "cp", "-r", str(src), dst]) == 0
    assert main(["storage", "ls", "-r", dst]) == 0
    listing = capsys.readouterr().out
    assert f"{dst}/a.txt" in listing and f"{dst}/sub/b.txt" in listing
    assert main(["storage", "cat", f"{dst}/sub/b.txt"]) == 0
    assert capsys.readouterr().out == "beta"
    assert main(["storage", "cp", "-r", dst, str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "sub" / "b.txt").read_text() == "beta"


def test_streaming_read_resumes_at_offset_after_server_restart(private_s3, monkeypatch):
    monkeypatch.setenv("S3_MAX_RETRIES", "8")
    monkeypatch.setenv("S3_RETRY_BASE_SECONDS", "0.2")
    data = os.urandom(24 * 1024 * 1024)
    uri = private_s3.uri("resume.bin")
    storage.put_bytes(uri, data)
    with storage.open_read(uri) as f:
        head = f.read(1024 * 1024)
        private_s3.restart(kill=True)  # the open HTTP response dies with the server
        rest = f.read()
    assert head + rest == data


def test_object_replaced_mid_read_is_an_error_not_a_mix(s3_env, s3_server):
    uri = s3_server.uri("replaced.bin")
    storage.put_bytes(uri, b"a" * (4 * 1024 * 1024))
    with storage.open_read(uri) as f:
        assert f.read(10) == b"a" * 10
        storage.put_bytes(uri, b"b" * (4 * 1024 * 1024))
        f.seek(2 * 1024 * 1024)  # the next read reopens the object at an offset
        with pytest.raises(StorageError, match="replaced while it was being read"):
            f.read(10)
