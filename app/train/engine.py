"""DeepSpeed set-up: process group, the DS config (ZeRO 0-3, precision, clipping) and the engine.

Only the student is given to DeepSpeed. The EMA teacher is a plain, replicated module that never
reaches the optimizer (see `app/ssl/meta_arch.py` for its update under each ZeRO stage).

CPU notes (reference/environment.md §2): DeepSpeed JIT-compiles a shared-memory comm op when the
engine starts on CPU (~35 s of g++); we skip it so plain gloo is used. The optimizer is a client
`torch.optim.AdamW` so DeepSpeed's JIT-compiled CPU FusedAdam is never built.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from app.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _skip_shm_comm_build() -> None:
    # `import deepspeed.comm.torch as m` would bind the real `torch` module (the deepspeed.comm
    # package shadows the name), so the patch must go through importlib.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _import_muon_uncompiled() -> None:
    """DeepSpeed's ZeRO optimizer check imports its Muon optimizer, whose kernels are wrapped in
    `torch.compile` at import: loading TorchDynamo's compiler costs ~2-4 s of CPU in every process,
    for an optimizer dinoctl never uses (the engine is given a torch AdamW). Import that module
    once with DeepSpeed's own compile hook (`deepspeed.runtime.compiler.compile`) as the identity."""
    name = "deepspeed.runtime.zero.muon.original_muon"
    if name in sys.modules:
        return
    compiler = importlib.import_module("deepspeed.runtime.compiler")
    real = compiler.compile
    compiler.compile = lambda: compiler.dummy_decorator
    try:
        importlib.import_module(name)
    except ImportError:  # another DeepSpeed layout: it compiles as it likes
        pass
    finally:
        compiler.compile = real


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join the torchrun process group (or a 1-process group when run without torchrun)."""
    import deepspeed

    _import_muon_uncompiled()

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        _skip_shm_comm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """`auto` means bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and not the recipe)."""
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def ds_config(cfg: Config, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config. Gradient clipping is always written out: DeepSpeed's default changed
    from 0 to 1.0 in 0.19.3. With `optim.clip_grad_mode: per_module` (the recipe: backbone and
    heads each clipped at `optim.clip_grad`) DeepSpeed's clipping is off and `app/train/clipping.py`
    clips between backward and step; with `global` DeepSpeed clips one norm at `optim.clip_grad`.
    """
    micro = cfg.train.batch_size_per_gpu
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": float(cfg.optim.clip_grad) if cfg.optim.clip_grad_mode == "global" else 0.0,
        "zero_optimization": {"stage": int(cfg.train.zero_stage)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }


def build_optimizer(param_groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """AdamW(beta1, beta2) over the recipe's parameter groups; lr/wd are set every step."""
    groups = [g for g in param_groups if len(list(g["params"])) > 0]
    return torch.optim.AdamW(
        groups, lr=0.0, weight_decay=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        foreach=True,
    )


def build_engine(student: torch.nn.Module, param_groups: list[dict], cfg: Config, world_size: int,
                 precision: str):
    """`deepspeed.initialize` on the student with a client AdamW. Returns the engine."""
    import deepspeed

    optimizer = build_optimizer(param_groups, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=student, optimizer=optimizer, config=ds_config(cfg, world_size, precision),
    )
    return engine


def build_clipper(engine, cfg: Config):
    """The per-module clipper of `optim.clip_grad_mode: per_module` (None with `global`, or when
    `optim.clip_grad` is 0: no clipping)."""
    if cfg.optim.clip_grad_mode != "per_module" or cfg.optim.clip_grad <= 0:
        return None
    from app.train.clipping import ModuleClipper

    return ModuleClipper(engine, cfg.optim.clip_grad)


def optimizer_param_groups(engine) -> list[dict]:
    """The param groups whose `lr`/`weight_decay` the schedules set (the wrapped torch optimizer's,
    under every ZeRO stage, so the extra keys such as `lr_multiplier` are still there)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return (inner if inner is not None else opt).param_groups


def shutdown(graceful: bool = True) -> None:
    """Always tear the group down: without it gloo sometimes aborts at exit (environment.md §2).

    `graceful` waits for every rank first (a clean end); after a failure there is no barrier:
    the rank that failed, or the one it waits for, may be gone."""
    if dist.is_initialized():
        try:
            if graceful:
                dist.barrier()
        finally:
            dist.destroy_process_group()
