"""`torchrun -m app.entry pretrain --config <yaml> [--set a.b=c ...] [--resume auto|never|URI]`

Parse the config, build the parts (process group, student + teacher, DeepSpeed engine,
schedules, loader, tracker), resume if asked, run the loop, export. Exit codes: 0 done,
1 failed (e.g. a non-finite loss), 2 bad config, 143 preempted after a checkpoint (retryable).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time

import torch

from app.config import Config, config_hash, dump_yaml, load_config

log = logging.getLogger("app.train")


def parse_args(argv: list[str], stage: str = "pretrain") -> argparse.Namespace:
    """`app.entry <stage> --config ... [--set k=v] [--resume ...]` (pretrain and distill)."""
    p = argparse.ArgumentParser(prog=f"app.entry {stage}")
    p.add_argument("stage", nargs="?", default=stage)
    p.add_argument("--config", required=True, help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--resume", default=None, help="auto | never | checkpoint URI (train.resume)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(args.config, args.set)  # a ConfigError becomes one line in app.entry
    if args.resume:
        cfg.train.resume = args.resume
    return run(cfg)


def run(cfg: Config) -> int:
    return run_guarded(_train, cfg, what="pretrain")


def run_guarded(body, cfg: Config, setup_errors: tuple[type[Exception], ...] = (),
                what: str = "train") -> int:
    """Join the process group, set up logging and run body(cfg, dist_info) -> exit code: one of
    setup_errors is exit 2, a non-finite loss or any other error exit 1, each as one line (with
    the traceback first for errors that are not ours). The process group is always shut down;
    after a failure without waiting for the other ranks, which may be the ones that are gone."""
    from app.train.engine import init_distributed, shutdown
    from app.train.step import NonFiniteLoss

    dist_info = init_distributed(cfg.train.collective_timeout_s)
    setup_logging(dist_info.rank)
    ok = False
    lease = None
    try:
        lease = take_run_lease(cfg, dist_info.rank)
        rc = body(cfg, dist_info)
        ok = rc == 0
        return rc
    except setup_errors as exc:
        log.error("%s: %s", what, exc)
        return 2
    except NonFiniteLoss as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - the job must end, with a line that says why
        from app.errors import one_line, is_expected

        if not is_expected(exc):
            log.exception("%s failed", what)
        log.error("%s: error: %s", what, one_line(exc))
        return 1
    finally:
        if lease is not None:
            lease.release()
        shutdown(graceful=ok)


def take_run_lease(cfg: Config, rank: int):
    """Rank 0 takes the lease on <store>/runs/<run.name> (app/storage/lease.py); every rank
    learns the outcome, so a refused job ends on all ranks at once. None when leases are off."""
    import torch.distributed as dist

    from app import storage
    from app.storage.lease import Lease, LeaseHeld

    if cfg.train.lease_ttl_s <= 0:
        return None
    lease, refusal = None, ""
    if rank == 0:
        try:
            lease = Lease(storage.join(storage.to_uri(cfg.run.store), "runs", cfg.run.name),
                          ttl_s=float(cfg.train.lease_ttl_s)).acquire()
        except LeaseHeld as exc:
            refusal = str(exc)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise LeaseHeld(refusal)
    return lease


def _train(cfg: Config, d) -> int:
    from app.data.loader import MultiCropLoader
    from app.data.sampler import DataCursor
    from app.ssl.meta_arch import LossWeights, SSLMetaArch, build_network, register_zero3_external_params
    from app.ssl.param_groups import get_params_groups, group_layout
    from app.ssl.schedules import Schedules
    from app.train import checkpoint as ckpt
    from app.train.engine import build_clipper, build_engine, resolve_precision
    from app.train.loop import (PREEMPTED_EXIT_CODE, LoopConfig, StopFlag, export_run,
                                run_summary, sample_log_from_env, sigterm_grace, train_loop)
    from app.train.step import TrainParts

    started = time.monotonic()
    stop = StopFlag(sigterm_grace(cfg.train.sigterm_grace_s))
    stop.install()
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    student = build_network(cfg)
    meta = SSLMetaArch(student, LossWeights.from_config(cfg)).to(d.device)
    precision = resolve_precision(cfg, d.device)
    groups = get_params_groups(student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
                               decay_tokens=cfg.optim.decay_learned_tokens)
    layout = group_layout(groups)  # before DeepSpeed replaces the groups' params by partitions
    zero_stage = cfg.train.zero_stage
    if zero_stage == 3:
        register_zero3_external_params(student)
    engine = build_engine(student, groups, cfg, d.world_size, precision)
    schedules = Schedules.from_config(cfg, d.world_size)
    # Drop-path and other model randomness differ per rank, as in data-parallel training.
    torch.manual_seed(cfg.run.seed * 1000 + d.rank + 1)

    start_step, cursor = 0, DataCursor()
    resume_uri = ckpt.resolve_resume(cfg.train.resume, cfg.run.store, cfg.run.name)
    if resume_uri:
        state = ckpt.load_checkpoint(engine, meta, resume_uri, cfg.run.name, d.rank,
                                     d.world_size, zero_stage, layout)
        start_step, cursor = int(state["step"]), DataCursor.from_dict(state["data_cursor"])
    loader = MultiCropLoader(cfg, d.rank, d.world_size, cursor, start_step=start_step)

    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    parts = TrainParts(engine, meta, schedules, zero_stage, compute_dtype, build_clipper(engine, cfg))
    lc = LoopConfig.from_config(cfg, d, zero_stage, schedules.total_iters,
                                {"config_hash": config_hash(cfg), "param_groups": layout})
    sample_log = sample_log_from_env(d.rank)
    log.info("pretrain %s: %s, ZeRO-%d, %s, world %d, steps %d..%d", cfg.run.name, cfg.model.arch,
             zero_stage, precision, d.world_size, start_step, schedules.total_iters)
    with stage_tracking(cfg) as tracker:  # rank 0 only; logs the resolved config as params
        result = train_loop(parts, loader, lc, start_step, tracker.log_metrics, stop, sample_log)
        if result.preempted:
            return PREEMPTED_EXIT_CODE
        if d.rank == 0:
            summary = run_summary(cfg, result, d.world_size, cfg.train.zero_stage, precision, started)
            export_run(parts, cfg.run.store, cfg.run.name, dump_yaml(cfg), summary)
            tracker.log_summary(summary)
    return 0


@contextlib.contextmanager
def stage_tracking(cfg: Config, stage: str = "pretrain"):
    """The MLflow run of this stage (`app.tracking`; a no-op tracker on ranks other than 0).
    Buffered (`app/tracking/buffered.py`): a tracking server that is down or goes away costs at
    most the metrics of the outage, never the training run, and never blocks a step."""
    from app.tracking import get_tracker
    from app.tracking.buffered import buffered_run
    from app.tracking.system_metrics import system_metrics

    with buffered_run(get_tracker(), stage, config=cfg) as tracker:
        interval = cfg.train.system_metrics_interval_s if getattr(tracker, "enabled", False) else 0
        with system_metrics(tracker.log_metrics, interval):
            yield tracker


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
