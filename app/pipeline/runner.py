"""Run the stage graph: each stage is a JobSpec through an executor, outputs pass by storage URI.

Plan first, then run: a stage is `cached` when its output marker exists and nothing upstream ran
in this pipeline run, `not available` when its code is not built yet (never faked), `blocked` when
a stage it needs is unavailable or failed, else it runs. A pipeline whose stages are all cached
is a no-op: no job, no MLflow run. Otherwise one MLflow parent run wraps the stage jobs, and each
stage process attaches its own child run through `DINOCTL_PARENT_RUN_ID`.

The driver is restartable, on either backend:
- each stage's resolved config is written to the store (`<store>/runs/<run>/pipeline/<stage>.yaml`)
  and the job reads it from there (`--config <uri>`): a pod never needs a file of this machine;
- job names are `<run>-<stage>-<attempt>`: a driver started again finds the stage's newest
  attempt still running and adopts it (waits on it) instead of submitting a second job; a finished
  attempt of a stage whose marker is missing (it failed) is followed by attempt + 1, which resumes
  from its run's LATEST checkpoint (`train.resume: auto`);
- one driver at a time: it holds a lease on `<store>/runs/<run>/pipeline/` (app/storage/lease.py);
- `state.json` there records each stage's status, job and attempt (`dinoctl pipeline status`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from app import storage
from app.config import Config, ConfigError, apply_overrides, dump_yaml
from app.pipeline.stages import REGISTRY, Stage, synth_marker, synth_uri
from app.progress import ProgressView, parse_progress

log = logging.getLogger(__name__)


LABEL_PIPELINE = "dinoctl.dev/pipeline"
LABEL_ATTEMPT = "dinoctl.dev/attempt"
STATE_FILE = "state.json"


class PipelineBusy(RuntimeError):
    """Another driver holds this pipeline run's lease; the message names it."""


@dataclass
class StageResult:
    name: str
    status: str  # ran | cached | not available | blocked | failed | planned | running
    seconds: float = 0.0
    metric: str = ""
    job: str = ""
    detail: str = ""
    attempt: int = 0


def pipeline_uri(cfg: Config, *parts: str) -> str:
    """Where the driver keeps a pipeline run's stage configs, lease and state."""
    return storage.join(storage.to_uri(cfg.run.store), "runs", cfg.run.name, "pipeline", *parts)


def stage_job_name(run: str, stage: str, attempt: int) -> str:
    """`<run>-<stage>-<attempt>` as a DNS-1035 label (the same for every driver of the run); a
    long run name is cut, never the stage or the attempt."""
    from app.launch.commands import dns1035

    suffix = f"-{stage}-{attempt}"
    return dns1035(run, 63 - len(suffix)) + suffix


def stage_overrides(cfg: Config, stage: str) -> list[str]:
    """The `--set` items `pipeline.stage_overrides` gives this stage's job."""
    out = []
    for item in cfg.pipeline.stage_overrides:
        name, _, setting = item.partition(":")
        if name == stage:
            out.append(setting)
    return out


def read_state(cfg: Config) -> dict | None:
    uri = pipeline_uri(cfg, STATE_FILE)
    return storage.get_json(uri) if storage.exists(uri) else None


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
    stray = sorted({i.partition(":")[0] for i in cfg.pipeline.stage_overrides} - set(cfg.pipeline.stages))
    if stray:
        raise ConfigError(f"'pipeline.stage_overrides' names stage(s) {stray} not in pipeline.stages")
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
    def __init__(self, cfg: Config, executor, registry: dict[str, Stage] | None = None,
                 echo: Callable[[str], None] = print, progress: ProgressView | None = None):
        self.cfg = cfg
        self.executor = executor
        self.registry = registry or REGISTRY
        self.echo = echo
        self.progress = progress or ProgressView()
        self.driver = f"driver:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.kubernetes = getattr(executor, "backend", "local") == "kubernetes"
        if self.kubernetes and not storage.to_uri(cfg.run.store).startswith("s3://"):
            raise ConfigError(f"'run.store' is {cfg.run.store}: stage pods cannot read it; with "
                              "--backend k8s the store is s3:// (set DINOCTL_STORE or --set run.store=s3://...)")

    def _plan(self, force: set[str]) -> tuple[list[StageResult], bool, dict[str, str]]:
        cfg = self.cfg
        results = plan(cfg, self.registry, force)
        synth_needed = cfg.pipeline.synth and ("synth" in force or not storage.exists(synth_marker(cfg)))
        upstream: dict[str, str] = {"synth": synth_uri(cfg)} if cfg.pipeline.synth else {}
        for r in results:
            if r.status == "cached":
                upstream[r.name] = self.registry[r.name].output_uri(cfg)
        return results, synth_needed, upstream

    def run(self, force: set[str] | None = None) -> list[StageResult]:
        force = set(force or ())
        results, synth_needed, upstream = self._plan(force)
        if not synth_needed and not any(r.status == "planned" for r in results):
            return results  # all done already: a no-op

        with self._lease():
            # Planned again under the lease: a driver this one waited for may have finished stages.
            results, synth_needed, upstream = self._plan(force)
            if not synth_needed and not any(r.status == "planned" for r in results):
                return results
            return self._run_planned(results, synth_needed, upstream)

    def _run_planned(self, results: list[StageResult], synth_needed: bool,
                     upstream: dict[str, str]) -> list[StageResult]:
        cfg = self.cfg
        with _ParentRun(cfg) as parent:
            parent_id = parent.run_id
            self._save_state(results, parent_id)
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
                self._run_stage(r, upstream, parent_id, lambda: self._save_state(results, parent_id))
                if r.status == "ran":
                    upstream[r.name] = self.registry[r.name].output_uri(cfg)
                else:
                    failed = r.name
            self._save_state(results, parent_id)
            parent.log_results(results)
        return results

    @contextlib.contextmanager
    def _lease(self):
        from app.storage.lease import Lease, LeaseHeld

        ttl = float(self.cfg.pipeline.lease_ttl_s)
        lease = Lease(pipeline_uri(self.cfg), ttl_s=ttl, holder=self.driver)
        try:  # a live holder renews every ttl / 4: still fresh after 1.5 ttl means alive
            lease.acquire(wait_s=1.5 * ttl + 2, poll_s=min(2.0, ttl / 4))
        except LeaseHeld as exc:
            raise PipelineBusy(f"pipeline {self.cfg.run.name}: another driver is running it "
                               f"({exc}); one driver at a time adopts the stage jobs") from None
        try:
            yield lease
        finally:
            lease.release()

    def _save_state(self, results: list[StageResult], parent_id: str) -> None:
        """state.json: what `dinoctl pipeline status` shows. A store hiccup costs the view only."""
        state = {"run": self.cfg.run.name, "backend": getattr(self.executor, "backend", "local"),
                 "driver": self.driver, "parent_run_id": parent_id, "updated_at": time.time(),
                 "stages": [dataclasses.asdict(r) for r in results]}
        try:
            storage.put_json(pipeline_uri(self.cfg, STATE_FILE), state)
        except storage.StorageError as exc:
            log.warning("pipeline state not saved: %s", exc)

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

    def stage_config(self, stage: Stage, upstream: dict[str, str]) -> tuple[Config, str]:
        """The stage's resolved config (upstream URIs and `pipeline.stage_overrides` applied),
        written to the store, where the job reads it (any backend: a pod reads s3://)."""
        overrides = stage.inputs(self.cfg, upstream) + stage_overrides(self.cfg, stage.name)
        cfg = apply_overrides(copy.deepcopy(self.cfg), overrides)
        uri = pipeline_uri(self.cfg, f"{stage.name}.yaml")
        storage.put_bytes(uri, dump_yaml(cfg).encode())
        return cfg, uri

    def _find_attempt(self, stage: str) -> tuple[int, Any]:
        """The attempt to run: the newest one of this stage still running (adopted), else the
        first number no job has taken. Returns (attempt, its JobStatus or None)."""
        jobs = {j.name: j for j in self.executor.list()}
        attempt = 1
        while True:
            found = jobs.get(stage_job_name(self.cfg.run.name, stage, attempt))
            if found is None or not found.done:
                return attempt, found
            attempt += 1

    def _run_stage(self, r: StageResult, upstream: dict[str, str], parent_id: str,
                   saved: Callable[[], None] = lambda: None) -> None:
        from app.launch.commands import dns1035, spec_from_config

        stage = self.registry[r.name]
        r.attempt, running = self._find_attempt(r.name)
        r.job = stage_job_name(self.cfg.run.name, r.name, r.attempt)
        started = time.monotonic()
        if running is not None:
            self.echo(f"{r.name}: adopting job {r.job}, still {running.phase.lower()} "
                      f"(attempt {r.attempt}, started by an earlier driver)")
        else:
            cfg, uri = self.stage_config(stage, upstream)
            spec = spec_from_config(cfg, stage.entry, [*stage.entry_args, "--config", uri], name=r.job,
                                    entry_module=stage.entry_module)
            env = dict(spec.env)
            if parent_id:
                env["DINOCTL_PARENT_RUN_ID"] = parent_id
                if not self.kubernetes:  # pods take MLflow's address from the cluster's settings
                    from app.tracking import tracking_uri

                    env["MLFLOW_TRACKING_URI"] = tracking_uri()
            labels = {**dict(spec.labels), LABEL_PIPELINE: dns1035(self.cfg.run.name),
                      LABEL_ATTEMPT: str(r.attempt)}
            spec = dataclasses.replace(spec, env=tuple(env.items()), labels=tuple(labels.items()))
            r.job = self.executor.submit(spec)
            self.echo(f"{r.name}: running job {r.job}  (dinoctl logs {r.job} --follow)")
        r.status = "running"
        saved()
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


def status_rows(cfg: Config, executor, registry: dict[str, Stage] | None = None) -> list[list[str]]:
    """One row per stage for `dinoctl pipeline status`: STAGE, STATUS (done when its marker
    exists, else what the last driver recorded), JOB, PHASE and RESTARTS (asked of the backend
    now), KEY METRIC, NOTE."""
    registry = registry or REGISTRY
    recorded = {s["name"]: s for s in (read_state(cfg) or {}).get("stages", [])}
    planned = {r.name: r for r in plan(cfg, registry, set())}
    rows = []
    for name in [*(["synth"] if "synth" in recorded else []), *cfg.pipeline.stages]:
        rec, p = recorded.get(name, {}), planned.get(name)
        if p is not None and p.status in ("not available", "blocked"):
            status, note = p.status, p.detail
        elif name in registry and storage.exists(registry[name].marker(cfg)):
            status, note = "done", ""
        else:
            status, note = rec.get("status") or "pending", rec.get("detail", "")
        job, phase, restarts = rec.get("job", ""), "-", "-"
        if job:
            try:
                live = executor.status(job)
                phase, restarts = live.phase, str(live.restarts)
            except Exception as exc:  # noqa: BLE001 - a deleted job still has a row
                phase = f"unknown ({str(exc).splitlines()[0][:80]})"
        metric = _metric_text(registry[name], cfg) if status == "done" and name in registry else ""
        rows.append([name, status, job or "-", phase, restarts, metric or rec.get("metric") or "-", note])
    return rows


def status_table(rows: list[list[str]]) -> str:
    from app.launch.commands import format_table

    return format_table(rows, ["STAGE", "STATUS", "JOB", "PHASE", "RESTARTS", "KEY METRIC", "NOTE"])


def summary_table(results: list[StageResult]) -> str:
    from app.launch.commands import format_table

    rows = [[r.name, r.status, f"{r.seconds:.1f}s" if r.seconds else "-", r.metric or "-",
             r.detail] for r in results]
    return format_table(rows, ["STAGE", "STATUS", "DURATION", "KEY METRIC", "NOTE"])
