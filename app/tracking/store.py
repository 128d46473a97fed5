"""Where tracking goes: the MLflow server named by MLFLOW_TRACKING_URI, else the embedded store
under DINOCTL_HOME (default ./.dinoctl). Below both the tracker and the registry helpers."""

from __future__ import annotations

import os
from pathlib import Path

# MLflow 3 opens an experiment on the view its kind names; without the tag it shows the GenAI one
# (traces, token usage). dinoctl's runs are model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def dinoctl_home() -> Path:
    return Path(os.environ.get("DINOCTL_HOME") or Path.cwd() / ".dinoctl").resolve()


def embedded_store() -> tuple[str, str]:
    """`(backend store URI, artifact root URI)` of the embedded default."""
    home = dinoctl_home()
    return f"sqlite:///{home / 'mlflow.db'}", (home / "mlartifacts").as_uri()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_store()[0]


def tracking_enabled() -> bool:
    """False when `DINOCTL_TRACKING` is `off` (or 0/false/no): stages then log nothing to MLflow
    (a quick run without a tracking store; `register` still needs one)."""
    return os.environ.get("DINOCTL_TRACKING", "on").strip().lower() not in ("off", "0", "false", "no")
