"""`dinoctl ui [--port 5000]`: the MLflow UI on the embedded store (or $MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the embedded tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to share it)")
    p.set_defaults(func=_ui)


def ui_command(host: str, port: int) -> list[str]:
    from app.tracking.store import dinoctl_home, embedded_store

    store, artifacts = embedded_store()
    dinoctl_home().mkdir(parents=True, exist_ok=True)
    Path(artifacts[len("file://"):]).mkdir(parents=True, exist_ok=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", store,
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port),
            "--workers", "1"]  # one person looking at runs; 4 uvicorn workers only cost memory


def _ui(args) -> int:
    remote = os.environ.get("MLFLOW_TRACKING_URI", "")
    if remote.startswith(("http://", "https://")):
        print(f"MLflow tracking server: {remote}")  # already has a UI; nothing to start
        return 0
    cmd = ui_command(args.host, args.port)
    print(f"MLflow UI: http://{args.host}:{args.port}  (store: {cmd[3]})", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
