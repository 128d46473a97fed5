"""Shared fixtures: real S3 (SeaweedFS) and MLflow servers, started once per session.

    def test_x(s3_env, s3_server):          # env points app.storage at the S3 server
        uri = s3_server.uri("obj.bin")      # s3://<bucket>/t-<unique>/obj.bin
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# 2-core CI: keep BLAS/OpenMP from oversubscribing before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests must never talk to a tracking server or object store from the developer's shell.
for _name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DINOCTL_PARENT_RUN_ID",
              "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_CREDENTIALS_DIR",
              "DINOCTL_STORE", "DINOCTL_CONFIG_DIR", "DINOCTL_TRACKING"):
    os.environ.pop(_name, None)

from tests.guard import UserStateGuard  # noqa: E402
from tests.services import embedded_mlflow_home  # noqa: E402
from tests.services import mlflow_server as _mlflow_server  # noqa: E402
from tests.services import seaweedfs  # noqa: E402

# Anything the suite starts without a home of its own (a job launched with the checkout as its
# working directory, a subprocess) writes here, never into the checkout's .dinoctl/ or mlruns/.
_GUARD = UserStateGuard(ROOT)
os.environ["DINOCTL_HOME"] = str(_GUARD.session_home)


def pytest_sessionfinish(session, exitstatus):
    problem = _GUARD.finish()
    if problem:
        session.config.get_terminal_writer().line(f"\nuser state changed by the suite: {problem}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server with SigV4 auth and an existing bucket (see tests/services.py)."""
    root = tmp_path_factory.mktemp("seaweedfs")
    with seaweedfs(root, access_key="dinoctl-test", secret_key=uuid.uuid4().hex,
                   bucket="dinoctl-test") as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point `app.storage` at the session S3 server for this test only."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("S3_CREDENTIALS_DIR", "S3_CREATE_BUCKET", "S3_MAX_RETRIES",
                 "S3_RETRY_BASE_SECONDS", "S3_PART_SIZE_MB", "S3_VERIFY_TLS"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """An MLflow server (sqlite backend) proxying artifacts to s3://<bucket>/mlflow."""
    with _mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server) as server:
        yield server


@pytest.fixture
def dinoctl_home(tmp_path, monkeypatch):
    """Run in an empty directory with DINOCTL_HOME there, so the embedded MLflow store is fresh."""
    home = tmp_path / "dinoctl-home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DINOCTL_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DINOCTL_PARENT_RUN_ID",
                 "MLFLOW_RUN_ID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def embedded_mlflow(dinoctl_home):
    """`dinoctl_home` with a ready (empty) embedded MLflow store: app.tracking works at once."""
    return embedded_mlflow_home(dinoctl_home)
