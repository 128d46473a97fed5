"""Real servers for tests and benchmarks: SeaweedFS (`weed mini`, S3 with SigV4) and MLflow.

Both are plain context managers so benchmark scripts can start the same servers as the tests:

    with seaweedfs(tmp, "key", "secret", "bucket") as s3, mlflow_server(tmp, s3) as ml:
        ...  # s3.endpoint, s3.env, ml.uri

Every server runs in its own process group on loopback ports picked here, and is stopped with
SIGTERM then SIGKILL of the whole group, so no `weed`/`mlflow` process outlives the block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent  # the venv's bin: `weed` and `mlflow` live next to python
LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children may outlive the leader (gunicorn/uvicorn workers): kill whatever is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _wait_until(check, timeout: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s (log: {log})")


# ----------------------------------------------------------------------------------------------
# SeaweedFS
# ----------------------------------------------------------------------------------------------

_WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
    "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc",
    "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc", "webdav.port",
    "metricsPort", "s3.metricsPort",
)


@dataclass
class SeaweedFS:
    """A `weed mini` S3 server that can be stopped and restarted on the same ports and data."""

    root: Path
    access_key: str
    secret_key: str
    bucket: str
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def uri(self, prefix: str = "") -> str:
        """A fresh `s3://bucket/<unique>/prefix` so tests never see each other's objects."""
        base = f"s3://{self.bucket}/t-{uuid.uuid4().hex[:12]}"
        return f"{base}/{prefix.strip('/')}" if prefix else base

    def client(self, secret_key: str | None = None):
        import minio

        return minio.Minio(
            f"{LOOPBACK}:{self.ports['s3.port']}", access_key=self.access_key,
            secret_key=secret_key or self.secret_key, secure=False, region="us-east-1",
        )

    def start(self, timeout: float = 120.0) -> None:
        if not self.ports:
            self.ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS))))
        data, logs, tmp = self.root / "data", self.root / "logs", self.root / "tmp"
        for d in (data, logs, tmp):
            d.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(BIN / "weed"), f"-logdir={logs}", "mini", f"-dir={data}", f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}", "-admin.ui=false", "-webdav=false",
            "-s3.autoCreateBucket=false",  # like AWS/MinIO: a PUT to a missing bucket fails
        ] + [f"-{flag}={port}" for flag, port in self.ports.items()]
        if len(str(tmp)) < 90:  # unix socket paths are limited to 108 bytes
            cmd += [f"-filer.localSocket={tmp / 'filer.sock'}", f"-s3.localSocket={tmp / 's3.sock'}"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key, "TMPDIR": str(tmp)}
        log = logs / "stdout.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)
        self.starts += 1
        client = self.client()

        def ready() -> bool:
            # A real, signed request: the S3 port answering is not enough, auth must be loaded.
            import urllib3
            from minio.error import MinioException

            try:
                if not client.bucket_exists(self.bucket):
                    client.make_bucket(self.bucket)
                return True
            except (MinioException, urllib3.exceptions.HTTPError, OSError):
                return False  # not up yet, or auth not loaded yet; bad arguments still raise

        try:
            _wait_until(ready, timeout, self.proc, "weed mini", log)
        except BaseException:
            self.stop(kill=True)
            raise

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the server (SIGKILL at once with `kill=True`, like a crashed node)."""
        if self.proc is None:
            return
        if kill and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        _stop_group(self.proc, timeout)
        self.proc = None
        self._remove_tmp_sockets()

    def _remove_tmp_sockets(self) -> None:
        """weed puts some gRPC sockets in /tmp whatever TMPDIR says; they carry our port numbers."""
        ports = {str(p) for p in self.ports.values()}
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            if path.stem.rsplit("-", 1)[-1] in ports and path.is_socket():
                with contextlib.suppress(OSError):
                    path.unlink()

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()


@contextlib.contextmanager
def seaweedfs(tmpdir, access_key: str = "dinoctl-test", secret_key: str | None = None,
              bucket: str = "dinoctl") -> Iterator[SeaweedFS]:
    server = SeaweedFS(Path(tmpdir), access_key, secret_key or uuid.uuid4().hex, bucket)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """An MLflow server (sqlite backend, artifacts proxied to S3) that can be stopped and started
    again on the same port and database, like a restarted pod."""

    root: Path
    s3: SeaweedFS
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def artifacts_uri(self) -> str:  # where the server puts artifacts: s3://<bucket>/mlflow
        return f"s3://{self.s3.bucket}/mlflow"

    def start(self, timeout: float = 240.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.port:
            (self.port,) = free_ports(1)
        cmd = [
            str(BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", self.artifacts_uri, "--serve-artifacts", "--workers", "1",
        ]
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
               "AWS_ACCESS_KEY_ID": self.s3.access_key, "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1", "TMPDIR": str(self.root)}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = self.root / "mlflow-server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, OSError):
                return False

        try:
            _wait_until(ready, timeout, self.proc, "mlflow server", log)
        except BaseException:
            self.stop(kill=True)
            raise

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        _stop_group(self.proc, 10.0)
        self.proc = None


@contextlib.contextmanager
def mlflow_server(tmpdir, s3: SeaweedFS, timeout: float = 240.0) -> Iterator[MlflowServer]:
    server = MlflowServer(Path(tmpdir), s3)
    server.start(timeout)
    try:
        yield server
    finally:
        server.stop()


_SCHEMA: Path | None = None


def embedded_mlflow_home(home: Path) -> Path:
    """`home` as a DINOCTL_HOME whose embedded MLflow store already has its tables: a job
    started there logs at once instead of spending a second or two of CPU migrating an empty
    sqlite file (many training jobs in the suite, on 2 cores). An existing store is left as is.
    The empty schema is made once per test process, in a temporary directory."""
    global _SCHEMA
    import shutil
    import tempfile

    if _SCHEMA is None:
        from mlflow.tracking import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="dinoctl-mlflow-schema-")) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
        _SCHEMA = path
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "mlflow.db").exists():
        shutil.copy(_SCHEMA, home / "mlflow.db")
    return home
