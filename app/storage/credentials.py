"""S3 endpoint and keys from the environment or a mounted Kubernetes Secret.

Secret values never appear in `repr`, logs or error messages: only where they came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

from app.storage.base import StorageError

# Key names a Secret mount may use, in order of preference: MinIO style, then AWS style.
_ACCESS_FILES = ("accessKey", "AWS_ACCESS_KEY_ID", "access_key", "rootUser")
_SECRET_FILES = ("secretKey", "AWS_SECRET_ACCESS_KEY", "secret_key", "rootPassword")

_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # e.g. http://127.0.0.1:8333 (scheme decides TLS)
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    source: str = "env"  # where the keys came from, for error messages
    region: str = "us-east-1"
    verify_tls: bool = True
    create_bucket: bool = False

    @property
    def host(self) -> str:
        return urlparse(self.endpoint).netloc

    @property
    def secure(self) -> bool:
        return urlparse(self.endpoint).scheme == "https"

    def __repr__(self) -> str:  # keys left out on purpose
        return (f"S3Settings(endpoint={self.endpoint!r}, source={self.source!r}, "
                f"region={self.region!r}, verify_tls={self.verify_tls})")


def _read_secret_file(directory: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                # Secret mounts often carry a trailing newline from `kubectl create secret`.
                return f.read().strip()
    return None


def load_settings(environ: dict[str, str] | None = None) -> S3Settings:
    """Read `S3_ENDPOINT_URL`, keys (env or `S3_CREDENTIALS_DIR`), `S3_VERIFY_TLS`, `S3_CREATE_BUCKET`."""
    env = os.environ if environ is None else environ
    endpoint = env.get("S3_ENDPOINT_URL", "").strip().rstrip("/")
    if not endpoint:
        raise StorageError("S3_ENDPOINT_URL is not set (e.g. http://minio.dinoctl.svc:9000)")
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(f"S3_ENDPOINT_URL={endpoint!r}: expected http://host:port or https://host:port")
    if parsed.path not in ("", "/"):
        raise StorageError(f"S3_ENDPOINT_URL={endpoint!r}: must not contain a path")

    access, secret, source = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), "env"
    cred_dir = env.get("S3_CREDENTIALS_DIR", "")
    if cred_dir and not (access and secret):
        if not os.path.isdir(cred_dir):
            raise StorageError(f"S3_CREDENTIALS_DIR={cred_dir}: not a directory")
        access = _read_secret_file(cred_dir, _ACCESS_FILES)
        secret = _read_secret_file(cred_dir, _SECRET_FILES)
        source = f"S3_CREDENTIALS_DIR={cred_dir}"
        if not (access and secret):
            raise StorageError(
                f"S3_CREDENTIALS_DIR={cred_dir}: needs files accessKey and secretKey "
                "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if not (access and secret):
        raise StorageError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or S3_CREDENTIALS_DIR to a mounted Secret")
    return S3Settings(
        endpoint=endpoint,
        access_key=access,
        secret_key=secret,
        source=source,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        verify_tls=env.get("S3_VERIFY_TLS", "true").strip().lower() not in _FALSE,
        create_bucket=env.get("S3_CREATE_BUCKET", "0").strip().lower() in ("1", "true", "yes", "on"),
    )
