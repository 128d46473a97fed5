"""MLflow runs for pipelines and stages; only global rank 0 talks to MLflow.

    tracker = get_tracker()                                   # NullTracker on ranks != 0
    with tracker.start("pretrain", config=cfg) as run:        # child of $DINOCTL_PARENT_RUN_ID
        run.log_metrics({"loss/dino": 1.2, "lr": 1e-3}, step=10)
        run.log_summary({"knn": {"top1": 0.71}}, "eval.json")

Tracking URI: `MLFLOW_TRACKING_URI`, else the embedded store `sqlite:///<home>/mlflow.db` with
artifacts in `<home>/mlartifacts`, where `<home>` is `$DINOCTL_HOME` or `./.dinoctl`.
mlflow is imported on first use, so importing this module costs nothing on other ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from app.tracking import params as P
from app.tracking.registry import register_version
from app.tracking.store import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, embedded_store, tracking_enabled,
                                 tracking_uri)

log = logging.getLogger(__name__)


def global_rank() -> int:
    """RANK from the environment (torchrun/PyTorchJob), else torch.distributed if initialised."""
    if os.environ.get("RANK", "").strip():
        return int(os.environ["RANK"])
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def git_revision() -> str:
    rev = os.environ.get("DINOCTL_GIT_REV", "").strip()
    if rev:
        return rev
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def standard_tags(stage: str, config: Any = None) -> dict[str, str]:
    tags = {
        "stage": stage,
        "job_name": os.environ.get("DINOCTL_JOB_NAME", ""),
        "namespace": os.environ.get("DINOCTL_NAMESPACE", ""),
        "image": os.environ.get("DINOCTL_IMAGE", ""),
        "git_rev": git_revision(),
    }
    if config is not None and not isinstance(config, dict):
        from app.config import config_hash

        tags["config_hash"] = config_hash(config)
    elif isinstance(config, dict):
        import hashlib

        tags["config_hash"] = hashlib.sha256(
            json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    if tags["git_rev"]:
        tags["mlflow.source.git.commit"] = tags["git_rev"]
    if tags["image"]:
        tags["mlflow.docker.image.uri"] = tags["image"]
    return {k: v for k, v in tags.items() if v}


class Tracker:
    """One MLflow run at a time, logged through `MlflowClient` (no global fluent state)."""

    def __init__(self, uri: str | None = None, experiment: str | None = None):
        self.uri = uri or tracking_uri()
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dinoctl"
        self.run_id: str | None = None
        self._client = None

    @property
    def enabled(self) -> bool:
        return True

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                # made before dinoctl set the kind (or by hand): MLflow would open it as GenAI
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if not self.uri.startswith(("http://", "https://")):
            # A local store: artifacts go to <home>/mlartifacts, not MLflow's ./mlruns default.
            location = embedded_store()[1]
            Path(location[len("file://"):]).mkdir(parents=True, exist_ok=True)
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another rank or stage created it first
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def run_tags(self, stage: str, config: Any = None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict | None = None) -> tuple[str, dict]:
        """`(run name, tags)` of a new run for `stage`; may switch the experiment to the one the
        config names (when neither the caller nor MLFLOW_EXPERIMENT_NAME chose one)."""
        if config is not None and run_name is None and hasattr(config, "run"):
            run_name = f"{config.run.name}-{stage}"
            if experiment := getattr(config.run, "experiment", None):
                if not os.environ.get("MLFLOW_EXPERIMENT_NAME") and self.experiment == "dinoctl":
                    self.experiment = experiment
        parent = parent_run_id or os.environ.get("DINOCTL_PARENT_RUN_ID") or None
        all_tags = {**standard_tags(stage, config), **(tags or {})}
        all_tags["mlflow.runName"] = run_name or stage
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        return run_name or stage, {k: str(v)[: P.MAX_TAG_VALUE] for k, v in all_tags.items()}

    def create_run(self, run_name: str, tags: dict) -> str:
        """Create the run (synchronously) and make it this tracker's current run."""
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    @contextlib.contextmanager
    def start(self, stage: str, config: Any = None, run_name: str | None = None,
              parent_run_id: str | None = None, tags: dict | None = None) -> Iterator[Tracker]:
        """A run for `stage`, a child of `parent_run_id` or `$DINOCTL_PARENT_RUN_ID` if given.

        The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C.
        """
        name, all_tags = self.run_tags(stage, config, run_name, parent_run_id, tags)
        outer = self.run_id
        self.create_run(name, all_tags)
        status = "FAILED"
        try:
            if config is not None:
                self.log_config(config)
            yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                self.client.set_terminated(self.run_id, status)
            finally:
                self.run_id = outer

    def _need_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no active run: use `with tracker.start(stage): ...`")
        return self.run_id

    def log_config(self, config: Any) -> None:
        if isinstance(config, dict):
            flat, text = P.flatten_dict(config), json.dumps(config, indent=2, default=str)
            self.log_params(flat)
            self.client.log_text(self._need_run(), text, "config.json")
            return
        from app.config import dump_yaml, flatten

        self.log_params(flatten(config))
        self.client.log_text(self._need_run(), dump_yaml(config), "config.yaml")

    def log_params(self, params: dict[str, Any]) -> None:
        run_id = self._need_run()
        from mlflow.entities import Param

        for batch in P.chunks(P.param_items(params), P.PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in batch])

    def set_tags(self, tags: dict[str, Any]) -> None:
        run_id = self._need_run()
        from mlflow.entities import RunTag

        items = [RunTag(P.clean_key(k), str(v)[: P.MAX_TAG_VALUE]) for k, v in tags.items()
                 if not P.is_secret_key(str(k))]
        for batch in P.chunks(items, P.PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=batch)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        run_id = self._need_run()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            number = P.to_number(value)
            if number is not None:
                items.append(Metric(P.clean_key(key), number, now, int(step or 0)))
        for batch in P.chunks(items, P.METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch)

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = os.fspath(local_path)
        if os.path.isdir(path):
            self.client.log_artifacts(self._need_run(), path, artifact_path)
        else:
            self.client.log_artifact(self._need_run(), path, artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self._need_run(), obj, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self._need_run(), text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure saved as PNG under `name`."""
        self.client.log_figure(self._need_run(), figure, name)

    def log_image(self, image: Any, name: str) -> None:
        """A PNG: a path to a PNG file, or an HxW[xC] uint8 array / PIL image."""
        if isinstance(image, (str, os.PathLike)):
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / Path(name).name
                target.write_bytes(Path(image).read_bytes())
                parent = str(Path(name).parent)
                self.client.log_artifact(self._need_run(), str(target),
                                         None if parent == "." else parent)
            return
        self.client.log_image(self._need_run(), image, artifact_file=name)

    def log_summary(self, summary: dict, name: str = "summary.json", step: int | None = None) -> None:
        """Log `summary` as a JSON artifact and every finite numeric leaf as a metric."""
        self.log_dict(summary, name)
        self.log_metrics(P.numeric_leaves(summary), step)

    # -- model registry ---------------------------------------------------------------------

    def register_model(self, name: str, artifact_path: str, alias: str | None = None,
                       tags: dict | None = None, description: str | None = None) -> str:
        """Register `runs:/<run>/<artifact_path>` as a new version of `name`; returns the version."""
        return register_version(self.client, name, f"runs:/{self._need_run()}/{artifact_path}",
                                run_id=self.run_id, alias=alias, tags=tags, description=description)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def get_version_by_alias(self, name: str, alias: str):
        return self.client.get_model_version_by_alias(name, alias)


class NullTracker:
    """What ranks other than 0 get: the same methods, doing nothing."""

    uri = ""
    run_id = None
    enabled = False

    @contextlib.contextmanager
    def start(self, stage: str, config: Any = None, run_name: str | None = None,
              parent_run_id: str | None = None, tags: dict | None = None) -> Iterator[NullTracker]:
        yield self

    def _noop(self, *args, **kwargs) -> None:
        return None

    log_config = log_params = set_tags = log_metrics = log_metric = log_artifact = _noop
    log_dict = log_text = log_figure = log_image = log_summary = set_alias = _noop
    register_model = get_version_by_alias = _noop


def get_tracker(uri: str | None = None, experiment: str | None = None) -> Tracker | NullTracker:
    """Global rank 0's tracker; a NullTracker elsewhere, and everywhere with DINOCTL_TRACKING=off."""
    return Tracker(uri, experiment) if global_rank() == 0 and tracking_enabled() else NullTracker()
