"""System metrics of a training stage, as MLflow's UI expects them: `system/cpu_utilization_percentage`,
`system/system_memory_usage_megabytes`, `system/gpu_0_utilization_percentage`, ... .

MLflow's own monitors do the sampling (psutil for CPU, memory, disk and network; NVIDIA's NVML
through nvidia-ml-py for GPUs, when there are any). The points go through the stage's buffered
run (app/tracking/buffered.py) instead of MLflow's `SystemMetricsMonitor`, so they are kept
through a tracking-server outage like every other metric, and sampling stops with the stage.

    with system_metrics(run.log_metrics, interval_s=10):
        train()
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

log = logging.getLogger(__name__)
PREFIX = "system/"


def make_monitors() -> list:
    """MLflow's monitors for this machine: CPU/memory, disk, network, and GPU when one is there."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())  # raises without nvidia-ml-py or without an NVIDIA GPU
    except Exception as exc:  # noqa: BLE001 - any reason means "no GPU metrics"
        log.info("system metrics: no GPU metrics (%s)", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return monitors


def sample(monitors: list) -> dict[str, float]:
    """One reading of every monitor, as `system/<name>` metrics."""
    out: dict[str, float] = {}
    for monitor in monitors:
        monitor.collect_metrics()
        out.update({PREFIX + k: float(v) for k, v in monitor.aggregate_metrics().items()})
        monitor.clear_metrics()
    return out


@contextlib.contextmanager
def system_metrics(log_metrics: Callable[..., None], interval_s: float) -> Iterator[None]:
    """Log a reading when the block starts and every `interval_s` seconds after (steps 0, 1, ...)
    from a daemon thread while it runs; nothing when `interval_s` <= 0 or when psutil is
    missing (said once)."""
    if interval_s <= 0:
        yield
        return
    try:
        monitors = make_monitors()
    except ImportError as exc:
        log.warning("system metrics are off: %s", exc)
        yield
        return
    stop = threading.Event()
    step = 0

    def read_and_log() -> None:
        nonlocal step
        try:
            log_metrics(sample(monitors), step=step)
            step += 1
        except Exception as exc:  # noqa: BLE001 - a failed reading never stops training
            log.warning("system metrics: reading %d failed: %s", step, exc)

    def loop() -> None:
        read_and_log()
        while not stop.wait(interval_s):
            read_and_log()

    thread = threading.Thread(target=loop, name="system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5.0)
