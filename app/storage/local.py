"""`file://` backend: atomic writes by temp file + rename in the destination directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO, Iterator

from app.storage.base import NotFound, ObjectInfo, StorageError, parse_uri


def _path(uri: str) -> str:
    return parse_uri(uri)[2]


def _file_mode() -> int:
    # mkstemp creates 0600 files; objects should get the usual permissions (0666 minus umask).
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def _atomic_write(path: str, writer) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class LocalBackend:
    def put_file(self, uri: str, local_path: str) -> None:
        def write(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        _atomic_write(_path(uri), write)

    def put_stream(self, uri: str, stream: BinaryIO, length: int = -1) -> None:
        _atomic_write(_path(uri), lambda f: shutil.copyfileobj(stream, f, 1 << 20))

    def put_bytes(self, uri: str, data: bytes) -> None:
        _atomic_write(_path(uri), lambda f: f.write(data))

    def get_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def get_file(self, uri: str, local_path: str) -> None:
        src = _path(uri)
        if not os.path.isfile(src):
            raise NotFound(f"{uri}: no such object")
        with open(src, "rb") as source:
            _atomic_write(local_path, lambda f: shutil.copyfileobj(source, f, 1 << 20))

    def open_read(self, uri: str) -> BinaryIO:
        path = _path(uri)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such object") from None
        except IsADirectoryError:
            raise StorageError(f"{uri}: is a directory, not an object") from None

    def list_objects(self, prefix_uri: str, recursive: bool = True) -> Iterator[ObjectInfo]:
        prefix = _path(prefix_uri)
        # A prefix is a directory or the start of file names inside one, as on S3.
        if os.path.isdir(prefix):
            base, name_prefix = prefix, ""
        else:
            base, name_prefix = os.path.dirname(prefix), os.path.basename(prefix)
        if not os.path.isdir(base):
            return
        out = []
        if recursive:
            for root, dirs, files in os.walk(base):
                dirs.sort()
                for name in files:
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, base)
                    if name.startswith(".tmp-") or not rel.startswith(name_prefix):
                        continue
                    out.append(full)
        else:
            for name in os.listdir(base):
                full = os.path.join(base, name)
                if name.startswith(".tmp-") or not name.startswith(name_prefix):
                    continue
                out.append(full + ("/" if os.path.isdir(full) else ""))
        for full in sorted(out):
            if full.endswith("/"):
                yield ObjectInfo("file://" + full, 0, 0.0)
            else:
                st = os.stat(full)
                yield ObjectInfo("file://" + full, st.st_size, st.st_mtime)

    def exists(self, uri: str) -> bool:
        return os.path.isfile(_path(uri))

    def delete(self, uri: str) -> None:
        try:
            os.unlink(_path(uri))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix_uri: str) -> None:
        """Delete everything under the directory `prefix_uri`, the directory included (no empty
        directories are left behind)."""
        import shutil

        path = _path(prefix_uri).rstrip("/")
        if os.path.isdir(path):
            shutil.rmtree(path)

    def copy(self, src_uri: str, dst_uri: str) -> None:
        src = _path(src_uri)
        if not os.path.isfile(src):
            raise NotFound(f"{src_uri}: no such object")
        self.put_file(dst_uri, src)
