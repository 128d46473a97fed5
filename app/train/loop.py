"""The training loop: data -> step -> metrics -> checkpoint, top to bottom.

Every part is built elsewhere and passed in (`app/train/run.py`), so each can be tested alone.
A SIGTERM (Kubernetes deleting or preempting the pod) sets a flag; all ranks agree on it after
the current step (or right after a checkpoint that was being written), save a checkpoint unless
that one is it, and stop with `PREEMPTED_EXIT_CODE`. The flag also arms a deadline: if the
checkpoint is not done `grace_s` after the signal, the process exits 143 without it (LATEST still
names the previous complete checkpoint), so a pod always ends inside its termination grace
period. The loader's workers are stopped on every way out of the loop.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from app import storage
from app.data.loader import MultiCropLoader, batch_to
from app.train import checkpoint as ckpt
from app.train.metrics import Progress, StepTimer, peak_memory_mb
from app.train.step import TrainParts, train_step

log = logging.getLogger(__name__)

# 128 + SIGTERM: a PyTorchJob with restartPolicy ExitCode treats 128-255 as retryable (1-127 as
# permanent), and OnFailure restarts on any non-zero code; the restarted pod resumes from LATEST.
PREEMPTED_EXIT_CODE = 143


DEFAULT_SIGTERM_GRACE_S = 25.0  # inside Kubernetes' default terminationGracePeriodSeconds (30)


def sigterm_grace(configured: float) -> float:
    """`train.sigterm_grace_s`, else $DINOCTL_SIGTERM_GRACE_S (set in our pods), else 25 s."""
    if configured and configured > 0:
        return float(configured)
    raw = os.environ.get("DINOCTL_SIGTERM_GRACE_S", "").strip()
    try:
        return float(raw) if raw and float(raw) > 0 else DEFAULT_SIGTERM_GRACE_S
    except ValueError:
        raise ValueError(f"DINOCTL_SIGTERM_GRACE_S={raw!r}: expected a number of seconds") from None


class StopFlag:
    """Set by SIGTERM; read once per step and agreed on by all ranks. Arms a `grace_s` deadline
    after which the process exits `PREEMPTED_EXIT_CODE` whatever it is doing."""

    def __init__(self, grace_s: float = DEFAULT_SIGTERM_GRACE_S) -> None:
        self.requested = False
        self.pid = os.getpid()
        self.grace_s = grace_s
        self._deadline: threading.Timer | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker: the trainer stops it later
            return
        if not self.requested:
            log.warning("SIGTERM: finishing the step, then checkpointing (deadline %.0f s)",
                        self.grace_s)
            self._deadline = threading.Timer(self.grace_s, self._give_up)
            self._deadline.daemon = True
            self._deadline.start()
        self.requested = True  # only a flag: the current step finishes, then all ranks save

    def _give_up(self) -> None:
        log.error("SIGTERM %.0f s ago and no checkpoint finished since: exiting %d without one "
                  "(LATEST still names the last complete checkpoint)", self.grace_s,
                  PREEMPTED_EXIT_CODE)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(PREEMPTED_EXIT_CODE)

    def agreed(self, device: torch.device) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class LoopConfig:
    store: str
    run_name: str
    total_steps: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    world_size: int
    zero_stage: int
    rank: int
    device: torch.device
    global_batch: int
    extra_state: dict[str, Any] = field(default_factory=dict)
    stage: str = "pretrain"  # names the progress lines

    @classmethod
    def from_config(cls, cfg: Any, d: Any, zero_stage: int, total_steps: int,
                    extra_state: dict[str, Any], stage: str = "pretrain") -> "LoopConfig":
        """The loop settings of a run: cfg's run/train sections, d the distributed info."""
        return cls(
            store=cfg.run.store, run_name=cfg.run.name, total_steps=total_steps,
            checkpoint_every=max(cfg.train.checkpoint_every, 1),
            keep_checkpoints=cfg.train.keep_checkpoints, log_every=cfg.train.log_every,
            world_size=d.world_size, zero_stage=zero_stage, rank=d.rank, device=d.device,
            global_batch=cfg.train.batch_size_per_gpu * d.world_size, extra_state=extra_state,
            stage=stage,
        )


@dataclass
class LoopResult:
    steps: int
    preempted: bool
    last: dict[str, float]
    images_per_s: float
    skipped_samples: int = 0  # bad samples this rank replaced (since the run started or resumed)


def train_loop(parts: TrainParts, loader: MultiCropLoader, lc: LoopConfig, start_step: int,
               log_metrics: Callable[[dict[str, float], int], None], stop: StopFlag,
               sample_log: Callable[[int, list[str], dict[str, float]], None] | None = None) -> LoopResult:
    timer, overall = StepTimer(), StepTimer()
    progress = Progress(lc.total_steps, start_step, lc.log_every, enabled=lc.rank == 0, stage=lc.stage)
    values: dict[str, float] = {}
    step = start_step
    try:
        while step < lc.total_steps:
            t0 = time.monotonic()
            batch = batch_to(loader.next_batch(step), lc.device)
            t1 = time.monotonic()
            values = train_step(parts, batch, step)
            if lc.device.type == "cuda":
                torch.cuda.synchronize(lc.device)
            t2 = time.monotonic()
            timer.add(t2 - t1, t1 - t0, lc.global_batch)
            overall.add(t2 - t1, t1 - t0, lc.global_batch)
            if sample_log is not None:
                sample_log(step, batch["keys"], values)
            step += 1
            if step % lc.log_every == 0 or step == lc.total_steps:
                values.update(timer.summary(), peak_memory_mb=peak_memory_mb(lc.device))
                log_metrics(values, step)
            values["skipped_samples"] = float(loader.skipped)
            progress.update(step - 1, values)
            preempted = stop.agreed(lc.device)
            periodic = step % lc.checkpoint_every == 0 or step == lc.total_steps
            if preempted or periodic:
                save(parts, loader, lc, step)
                # A SIGTERM that came while this checkpoint was written: it is the one to keep.
                preempted = preempted or stop.agreed(lc.device)
            if preempted:
                log.warning("SIGTERM: checkpoint at step %d written; exiting with %d so the job "
                            "is retried and resumes", step, PREEMPTED_EXIT_CODE)
                return LoopResult(step, True, values, overall.summary()["images_per_s"],
                                  loader.skipped)
    finally:
        progress.close()
        loader.close()  # workers stop on every way out: success, SIGTERM, any exception
    return LoopResult(step, False, values, overall.summary()["images_per_s"], loader.skipped)


def save(parts: TrainParts, loader: MultiCropLoader, lc: LoopConfig, step: int) -> None:
    """Checkpoint after `step` steps (all ranks)."""
    state = {
        "step": step,
        "data_cursor": loader.cursor_at(step).to_dict(),
        "world_size": lc.world_size,
        "zero_stage": lc.zero_stage,
        **lc.extra_state,
    }
    ckpt.save_checkpoint(parts.engine, parts.meta, state, step, lc.store, lc.run_name,
                         lc.keep_checkpoints, lc.rank)


def export_run(parts: TrainParts, store: str, run_name: str, config_yaml: str,
               summary: dict[str, Any]) -> str:
    """Rank 0: teacher backbone (official keys), heads, config, summary, then `_SUCCESS` last."""
    return export_network(parts.meta.teacher, store, run_name, config_yaml, summary)


def export_network(net: Any, store: str, run_name: str, config_yaml: str,
                   summary: dict[str, Any]) -> str:
    """Rank 0: `net`'s backbone (official keys) and DINO/iBOT heads, config, summary, then
    `_SUCCESS` last (the pipeline's done-marker), under runs/<run_name>/export."""
    from app.models.convert import export_backbone

    out = storage.join(storage.to_uri(store), "runs", run_name, "export")
    export_backbone(net.backbone, storage.join(out, "backbone.pth"))
    heads = {"dino_head": {k: v.detach().cpu() for k, v in net.dino_head.state_dict().items()}}
    if net.ibot_head is not None:
        heads["ibot_head"] = {k: v.detach().cpu() for k, v in net.ibot_head.state_dict().items()}
    buf = io.BytesIO()
    torch.save(heads, buf)
    storage.put_bytes(storage.join(out, "heads.pth"), buf.getvalue())
    storage.put_bytes(storage.join(out, "config.yaml"), config_yaml.encode())
    storage.put_json(storage.join(out, "summary.json"), summary)
    storage.put_bytes(storage.join(out, "_SUCCESS"), b"")
    log.info("exported %s", out)
    return out


def run_summary(cfg: Any, result: LoopResult, world_size: int, zero_stage: int, precision: str,
                started: float) -> dict[str, Any]:
    """What a finished training run reports (summary.json, MLflow)."""
    from app.config import config_hash

    return {
        "run": cfg.run.name, "steps": result.steps,
        "final_losses": {k: v for k, v in result.last.items() if k.endswith("loss")},
        "images_per_s": result.images_per_s, "world_size": world_size,
        "skipped_samples": result.skipped_samples,
        "zero_stage": zero_stage, "precision": precision,
        "wall_s": round(time.monotonic() - started, 1), "config_hash": config_hash(cfg),
    }


def sample_log_from_env(rank: int) -> Callable[[int, list[str], dict[str, float]], None] | None:
    """`jsonl_sample_log` to $DINOCTL_SAMPLE_LOG.rank<r>.jsonl when that variable is set."""
    path = os.environ.get("DINOCTL_SAMPLE_LOG")
    return jsonl_sample_log(f"{path}.rank{rank}.jsonl", rank) if path else None


def jsonl_sample_log(path: str, rank: int) -> Callable[[int, list[str], dict[str, float]], None]:
    """Append `{"step", "rank", "keys", "losses"}` per step to `path` (a test/debug aid enabled by
    the env var DINOCTL_SAMPLE_LOG): it proves which samples each rank consumed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)

    def write(step: int, keys: list[str], values: dict[str, float]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "keys": keys, "losses": values}) + "\n")

    return write
