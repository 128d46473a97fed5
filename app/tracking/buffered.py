"""A stage's MLflow run that outlives the tracking server: logging never blocks and never fails
the stage because MLflow is down.

    with buffered_run(Tracker(), "pretrain", config=cfg) as run:    # rank 0; NullTracker elsewhere
        run.log_metrics({"total_loss": 1.2}, step=10)                 # queued, returns at once
        run.log_summary(summary)                                      # artifact now, if reachable

A background thread creates the run, logs the config, and sends queued params, tags and metrics
in order. When the server cannot be reached (down at start, killed mid-run) it says so once,
keeps everything queued (up to `max_points` metric points; older ones are then dropped, said
once) and tries again with backoff; the run appears, with its original steps and timestamps, as
soon as the server is back. At the end it waits at most `flush_timeout_s` for the queue to drain
and the run to be marked FINISHED/FAILED, then says how much could not be sent. Artifacts
(files, dicts, figures) are sent right away when the run is reachable and dropped with one
warning when not: they cannot wait for a file that may be gone by then.

MLflow's own HTTP retries (7 by default, minutes of backoff) are turned down in this process
unless set: this queue is the retry layer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 30.0
MAX_POINTS = 200_000
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 20.0)


def is_outage(exc: BaseException) -> bool:
    """The server is unreachable or failing (retry later), as opposed to a request it refused."""
    import requests

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        ConnectionError, TimeoutError)):
        return True
    text = str(exc)
    if type(exc).__name__ == "MlflowException":
        code = getattr(exc, "error_code", "")
        if code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"):
            return True
        return any(t in text for t in ("failed with exception", "Max retries exceeded",
                                        "Connection refused", "Response code 5", "503", "502"))
    return isinstance(exc, OSError)


class BufferedRun:
    """The queue and its sender thread for one run; use through `buffered_run`."""

    def __init__(self, tracker, stage: str, config: Any = None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict | None = None,
                 flush_timeout_s: float = FLUSH_TIMEOUT_S, max_points: int = MAX_POINTS):
        self.tracker = tracker
        self.uri = tracker.uri
        self.enabled = True
        self._name, self._tags = tracker.run_tags(stage, config, run_name, parent_run_id, tags)
        self._config = config
        self.flush_timeout_s = flush_timeout_s
        self.max_points = max_points
        self._ops: collections.deque = collections.deque()
        self._points = 0  # metric points queued
        self._dropped = 0
        self._cv = threading.Condition()
        self._closing = False
        self._created = False
        self._abandoned = False  # the server refused to create the run: nothing more is queued
        self._down_since: float | None = None
        self._warned_down = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self._created else None

    # -- queued --------------------------------------------------------------------------------

    def _put(self, op: str, *args: Any, points: int = 0) -> None:
        with self._cv:
            if self._abandoned:
                return
            self._ops.append((op, args, points))
            self._points += points
            while self._points > self.max_points and self._drop_oldest_metrics():
                pass
            self._cv.notify()

    def _drop_oldest_metrics(self) -> bool:
        for i, (op, _, points) in enumerate(self._ops):
            if op == "metrics":
                del self._ops[i]
                self._points -= points
                if not self._dropped:
                    log.warning("MLflow at %s is unreachable and %d metric points are queued: the "
                                "oldest are being dropped", self.uri, self.max_points)
                self._dropped += points
                return True
        return False

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        from app.tracking import params as P

        now = int(time.time() * 1000)
        items = [(P.clean_key(k), n, now, int(step or 0)) for k, v in metrics.items()
                 if (n := P.to_number(v)) is not None]
        if items:
            self._put("metrics", items, points=len(items))

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def log_params(self, params: dict[str, Any]) -> None:
        self._put("params", dict(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put("tags", dict(tags))

    # -- sent now, if the run is reachable -----------------------------------------------------

    def _now(self, what: str, fn, *args: Any) -> Any:
        if self._wait_created(5.0):
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - tracking never fails the stage
                if not is_outage(exc):
                    log.warning("MLflow refused %s: %s", what, str(exc).splitlines()[0][:300])
                    return None
        log.warning("MLflow at %s is unreachable: %s was not logged", self.uri, what)
        return None

    def log_dict(self, obj: Any, name: str) -> None:
        self._now(name, self.tracker.log_dict, obj, name)

    def log_text(self, text: str, name: str) -> None:
        self._now(name, self.tracker.log_text, text, name)

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        self._now(os.fspath(local_path), self.tracker.log_artifact, local_path, artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        self._now(name, self.tracker.log_figure, figure, name)

    def log_image(self, image: Any, name: str) -> None:
        self._now(name, self.tracker.log_image, image, name)

    def log_summary(self, summary: dict, name: str = "summary.json", step: int | None = None) -> None:
        from app.tracking import params as P

        self.log_dict(summary, name)
        self.log_metrics(P.numeric_leaves(summary), step)

    def log_config(self, config: Any) -> None:
        self._put("config", config)

    # -- the sender ----------------------------------------------------------------------------

    def _wait_created(self, timeout: float) -> bool:
        with self._cv:
            self._cv.wait_for(lambda: self._created or self._down_since is not None, timeout)
            return self._created

    def _outage(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not self._warned_down:
            self._warned_down = True
            log.warning("MLflow at %s is unreachable (%s): metrics are queued and sent when it "
                        "is back", self.uri, str(exc).splitlines()[0][:200])

    def _send_loop(self) -> None:
        attempt = 0
        while True:
            with self._cv:
                while not self._ops and not self._closing and self._created:
                    self._cv.wait()
                if self._closing and not self._ops and self._created:
                    return
            try:
                if not self._created:
                    self._create()
                else:
                    self._send_next()
                attempt = 0
                if self._down_since is not None:
                    log.warning("MLflow at %s is reachable again after %.0f s; queued metrics sent",
                                self.uri, time.monotonic() - self._down_since)
                    self._down_since, self._warned_down = None, False
            except Exception as exc:  # noqa: BLE001 - classified: wait, or drop this op
                if not is_outage(exc):
                    log.warning("MLflow refused a request (%s); it is dropped",
                                str(exc).splitlines()[0][:300])
                    with self._cv:
                        if not self._created:  # the run cannot be created at all: give up
                            self._abandoned = True
                            self._ops.clear()
                            self._points = 0
                            self._cv.notify_all()
                            return
                        if self._ops:
                            _, _, points = self._ops.popleft()
                            self._points -= points
                    continue
                self._outage(exc)
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                deadline = time.monotonic() + (min(delay, 2.0) if self._closing else delay)
                with self._cv:
                    self._cv.notify_all()
                    while time.monotonic() < deadline:
                        self._cv.wait(deadline - time.monotonic())
                attempt += 1

    def _create(self) -> None:
        self.tracker.create_run(self._name, self._tags)
        with self._cv:
            self._created = True
            if self._config is not None:  # the config is the first thing the run gets
                self._ops.appendleft(("config", (self._config,), 0))
            self._cv.notify_all()

    def _send_next(self) -> None:
        """Send the oldest op; consecutive metric ops go out as one batch."""
        with self._cv:
            if not self._ops:
                return
            op, args, points = self._ops[0]
            batch = [(op, args, points)]
            if op == "metrics":
                for item in list(self._ops)[1:]:
                    if item[0] != "metrics" or sum(p for _, _, p in batch) + item[2] > 900:
                        break
                    batch.append(item)
        if op == "metrics":
            self._send_metrics([m for _, (items,), _ in batch for m in items])
        elif op == "params":
            self.tracker.log_params(args[0])
        elif op == "tags":
            self.tracker.set_tags(args[0])
        elif op == "config":
            self.tracker.log_config(args[0])
        elif op == "terminate":
            self.tracker.client.set_terminated(self.tracker.run_id, args[0])
        with self._cv:
            for _ in batch:
                _, _, p = self._ops.popleft()
                self._points -= p

    def _send_metrics(self, items: list[tuple]) -> None:
        from mlflow.entities import Metric

        self.tracker.client.log_batch(self.tracker.run_id,
                                      metrics=[Metric(k, v, ts, step) for k, v, ts, step in items])

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "BufferedRun":
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
                            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(name, value)
        self._thread.start()
        return self

    def finish(self, status: str) -> None:
        """Queue the end of the run and wait (bounded) until everything is sent."""
        self._put("terminate", status)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._abandoned:
            return
        self._thread.join(self.flush_timeout_s)
        with self._cv:
            left = self._points
            pending = bool(self._ops)
        if pending:
            log.warning("MLflow at %s stayed unreachable: %d metric points and the run's end were "
                        "not logged (the run %s)", self.uri, left,
                        f"{self.tracker.run_id} stays RUNNING in MLflow" if self._created
                        else "was never created")
        elif self._dropped:
            log.warning("%d metric points of the outage were dropped (queue full)", self._dropped)


@contextlib.contextmanager
def buffered_run(tracker, stage: str, config: Any = None, **kwargs: Any) -> Iterator[Any]:
    """A `BufferedRun` for `tracker` (a `Tracker`); a `NullTracker` is passed through as is."""
    if not getattr(tracker, "enabled", False):
        yield tracker
        return
    run = BufferedRun(tracker, stage, config, **kwargs).start()
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run.finish(status)
