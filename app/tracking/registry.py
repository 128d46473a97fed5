"""Model registry helpers: versions of `dinov2-<arch>` with aliases (`candidate`, `champion`)."""

from __future__ import annotations

from typing import Any

from app.tracking.store import tracking_uri


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri(), registry_uri=uri or tracking_uri())


def register_version(client, name: str, source: str, run_id: str | None = None,
                     alias: str | None = None, tags: dict | None = None,
                     description: str | None = None) -> str:
    """Create `name` if needed, add a version from `source`, set `alias` on it; return the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()},
        description=description)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int, uri: str | None = None) -> None:
    _client(uri).set_registered_model_alias(name, alias, str(version))


def get_version_by_alias(name: str, alias: str, uri: str | None = None) -> Any:
    """The `ModelVersion` behind `models:/<name>@<alias>`."""
    return _client(uri).get_model_version_by_alias(name, alias)
