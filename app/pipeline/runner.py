"""Run the stage graph: each stage is a JobSpec through an executor, outputs pass by storage URI.

Plan first, then run: a stage is `cached` when its output marker exists and nothing upstream ran
in this pipeline run, `not available` when its code is not built yet (never faked), `blocked` when
a stage it needs is unavailable or failed, else it runs. A pipeline whose stages are all cached
is a no-op: no job, no MLflow run. Otherwise one MLflow parent run wraps the stage jobs, and each
stage process attaches its own child run through `DINOCTL_PARENT_RUN_ID`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from app import storage
from app.config import Config, ConfigError, apply_overrides, dump_yaml
from app.pipeline.stages import REGISTRY, Stage, synth_marker, synth_uri
from app.progress import ProgressView, parse_progress

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    status: str  # ran | cached | not available | blocked | failed | planned
    seconds: float = 0.0
    metric: str = ""
    job: str = ""
    detail: str = ""


def _metric_text(stage: Stage, cfg: Config) -> str:
    found = stage.key_metric(cfg)
    if found is None:
        return ""
    items = [found, *stage.extra_metrics(cfg)]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def plan(cfg: Config, registry: dict[str, Stage], force: set[str]) -> list[StageResult]:
    """What each configured stage would do, in order (see the module docstring)."""
    unknown = [s for s in cfg.pipeline.stages if s not in registry]
    if unknown:
        raise ConfigError(f"'pipeline.stages' has unknown stage(s) {unknown}; known: {', '.join(registry)}")
    results: dict[str, StageResult] = {}
    for name in cfg.pipeline.stages:
        stage = registry[name]
        missing = stage.missing_module()
        if missing:
            results[name] = StageResult(name, "not available", detail=f"{missing} is not built yet")
            continue
        blockers = [n for n in stage.needs if n in results
                    and results[n].status in ("not available", "blocked")]
        if blockers:
            results[name] = StageResult(name, "blocked", detail=f"needs {blockers[0]} "
                                        f"({results[blockers[0]].status})")
            continue
        upstream_runs = any(results[n].status == "planned" for n in results)
        if name in force or "all" in force or upstream_runs or not storage.exists(stage.marker(cfg)):
            results[name] = StageResult(name, "planned")
        else:
            results[name] = StageResult(name, "cached", metric=_metric_text(stage, cfg))
    return list(results.values())


class Pipeline:
    def __init__(self, cfg: Config, executor, home: str | Path, registry: dict[str, Stage] | None = None,
                 echo: Callable[[str], None] = print, progress: ProgressView | None = None):
        self.cfg = cfg
        self.executor = executor
        self.home = Path(home)
        self.registry = registry or REGISTRY
        self.echo = echo
        self.progress = progress or ProgressView()

    def run(self, force: set[str] | None = None) -> list[StageResult]:
        cfg, force = self.cfg, set(force or ())
        results = plan(cfg, self.registry, force)
        synth_needed = cfg.pipeline.synth and ("synth" in force or not storage.exists(synth_marker(cfg)))
        upstream: dict[str, str] = {"synth": synth_uri(cfg)} if cfg.pipeline.synth else {}
        for r in results:
            if r.status == "cached":
                upstream[r.name] = self.registry[r.name].output_uri(cfg)
        if not synth_needed and not any(r.status == "planned" for r in results):
            return results  # all done already: a no-op

        with _ParentRun(cfg) as parent:
            parent_id = parent.run_id
            if synth_needed:
                synth = self._synth()
                results.insert(0, synth)
                if synth.status == "failed":
                    for r in results[1:]:
                        if r.status == "planned":
                            r.status, r.detail = "blocked", "synth failed"
            failed = ""
            for r in results:
                if r.status != "planned":
                    continue
                if failed:
                    r.status, r.detail = "blocked", f"{failed} failed"
                    continue
                self._run_stage(r, upstream, parent_id)
                if r.status == "ran":
                    upstream[r.name] = self.registry[r.name].output_uri(cfg)
                else:
                    failed = r.name
            parent.log_results(results)
        return results

    def _synth(self) -> StageResult:
        from app.data.synth import synthesize

        started = time.monotonic()
        self.echo(f"synth: generating the synthetic data set under {synth_uri(self.cfg)}")
        n_pool = self.cfg.pipeline.synth_size
        scale = n_pool / 600  # the other splits keep `dinoctl data synth`'s proportions
        try:
            summary = synthesize(synth_uri(self.cfg), seed=self.cfg.run.seed, n_pool=n_pool,
                                 n_seeds=max(4, round(48 * scale)),
                                 n_eval_train=max(8, round(240 * scale)),
                                 n_eval_val=max(4, round(120 * scale)))
        except (OSError, ValueError, storage.StorageError) as exc:
            return StageResult("synth", "failed", time.monotonic() - started, detail=str(exc))
        n = sum(s["num_samples"] for s in summary["splits"].values())
        return StageResult("synth", "ran", time.monotonic() - started, metric=f"images={n}")

    def stage_config(self, stage: Stage, upstream: dict[str, str]) -> tuple[Config, Path]:
        """The stage's resolved config (upstream URIs applied), written where the job reads it."""
        cfg = apply_overrides(copy.deepcopy(self.cfg), stage.inputs(self.cfg, upstream))
        path = self.home / "pipelines" / self.cfg.run.name / f"{stage.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = dump_yaml(cfg)
        path.write_text(text)
        # Keep the resolved config next to the outputs too (DESIGN §3 Config).
        storage.put_bytes(storage.join(storage.to_uri(self.cfg.run.store), "runs", self.cfg.run.name,
                                       "pipeline", f"{stage.name}.yaml"), text.encode())
        return cfg, path

    def _run_stage(self, r: StageResult, upstream: dict[str, str], parent_id: str) -> None:
        import secrets

        from app.launch.commands import dns1035, spec_from_config

        stage = self.registry[r.name]
        cfg, path = self.stage_config(stage, upstream)
        suffix = f"-{secrets.token_hex(2)}"
        name = dns1035(f"{self.cfg.run.name}-{r.name}", 63 - len(suffix)) + suffix
        spec = spec_from_config(cfg, stage.entry, [*stage.entry_args, "--config", str(path)], name=name,
                                entry_module=stage.entry_module)
        env = dict(spec.env)
        if parent_id:
            from app.tracking import tracking_uri

            env.update(DINOCTL_PARENT_RUN_ID=parent_id, MLFLOW_TRACKING_URI=tracking_uri())
        spec = dataclasses.replace(spec, env=tuple(env.items()))
        started = time.monotonic()
        r.job = self.executor.submit(spec)
        self.echo(f"{r.name}: running job {r.job}  (dinoctl logs {r.job} --follow)")
        with follow_progress(self.executor, r.job, self.progress):
            status = self.executor.wait(r.job)
        r.seconds = time.monotonic() - started
        if status.phase != "Succeeded":
            r.status, r.detail = "failed", f"job {r.job} {status.phase}: {status.reason}"
        # Markers and summaries are named from the pipeline's config: a stage's own config may
        # rename its run (distill runs as <run>-distill).
        elif not storage.exists(stage.marker(self.cfg)):
            r.status, r.detail = "failed", f"job {r.job} succeeded but wrote no {stage.marker(self.cfg)}"
        else:
            r.status, r.metric = "ran", _metric_text(stage, self.cfg)
        self.echo(f"{r.name}: {r.status} in {r.seconds:.1f} s" + (f" ({r.detail})" if r.detail else ""))


@contextlib.contextmanager
def follow_progress(executor, job: str, view: ProgressView, retry_s: float = 5.0):
    """While the block runs, follow the job's master log and show its newest progress line
    (app/progress.py). Showing progress never fails the stage: a log that cannot be read yet
    (no pod scheduled) is tried again every `retry_s`."""
    stop = threading.Event()

    def follow() -> None:
        while not stop.is_set():
            try:
                for line in executor.logs(job, follow=True):
                    if stop.is_set():
                        return
                    if (p := parse_progress(line)) is not None:
                        view.show(p)
                return  # the job ended
            except Exception as exc:  # noqa: BLE001 - the log is a view, not the stage
                log.debug("progress of %s: %s", job, exc)
            stop.wait(retry_s)

    thread = threading.Thread(target=follow, name=f"progress-{job}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)
        view.clear()


class _ParentRun:
    """The pipeline's MLflow parent run; tracking problems cost the tracking, not the pipeline."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ctx = None
        self.tracker = None
        self.run_id = ""

    def __enter__(self) -> "_ParentRun":
        try:
            from app.tracking import get_tracker

            self.ctx = get_tracker().start("pipeline", config=self.cfg,
                                           run_name=f"{self.cfg.run.name}-pipeline")
            self.tracker = self.ctx.__enter__()
            self.run_id = self.tracker.run_id or ""
        except Exception as exc:  # noqa: BLE001 - an unreachable server must not stop the stages
            log.warning("MLflow tracking disabled for this pipeline: %s", exc)
            self.ctx = self.tracker = None
        return self

    def log_results(self, results: list[StageResult]) -> None:
        if self.tracker is None:
            return
        try:
            self.tracker.set_tags({f"stage.{r.name}": r.status for r in results})
            self.tracker.log_metrics({f"{r.name}.seconds": r.seconds for r in results
                                      if r.status == "ran"})
        except Exception as exc:  # noqa: BLE001
            log.warning("could not log the pipeline summary to MLflow: %s", exc)

    def __exit__(self, *exc: Any) -> bool:
        return bool(self.ctx.__exit__(*exc)) if self.ctx is not None else False


def summary_table(results: list[StageResult]) -> str:
    from app.launch.commands import format_table

    rows = [[r.name, r.status, f"{r.seconds:.1f}s" if r.seconds else "-", r.metric or "-",
             r.detail] for r in results]
    return format_table(rows, ["STAGE", "STATUS", "DURATION", "KEY METRIC", "NOTE"])
