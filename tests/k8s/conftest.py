"""Fixtures of the podman-backed cluster tests (scripts/test-k8s runs them; skipped without podman
or without the CPU and services images, which scripts/test-k8s builds)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.k8s.cluster import PODMAN

CPU_IMAGE = os.environ.get("DINOCTL_CPU_IMAGE", "ghcr.io/dinoctl/dinoctl:0.1.0-cpu")
SERVICES_IMAGE = os.environ.get("DINOCTL_SERVICES_IMAGE", "ghcr.io/dinoctl/dinoctl:0.1.0-services")
BASE_IMAGE = os.environ.get("DINOCTL_BASE_IMAGE", "docker.io/library/python:3.11-slim-bookworm")


def _have_image(name: str) -> bool:
    return subprocess.run([PODMAN, "image", "exists", name], capture_output=True).returncode == 0


def _missing(why: str) -> None:
    if os.environ.get("DINOCTL_K8S_REQUIRED") == "1":  # scripts/test-k8s: a skip would be a pass
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    if not shutil.which(PODMAN):
        _missing("podman is not installed (scripts/test-k8s installs it)")
    for name in (CPU_IMAGE, SERVICES_IMAGE, BASE_IMAGE):
        if not _have_image(name):
            _missing(f"image {name} is not built (scripts/test-k8s builds it)")
    return {"cpu": CPU_IMAGE, "services": SERVICES_IMAGE, "base": BASE_IMAGE}


@pytest.fixture(scope="session")
def stack(images, tmp_path_factory):
    """The chart's platform (S3 and MLflow pods from the services image) for every test here."""
    from tests.k8s.stack import start_stack

    with start_stack(images, tmp_path_factory.mktemp("cluster")) as running:
        yield running
