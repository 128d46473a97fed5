"""`torchrun -m app.entry distill --config <yaml> [--set a.b=c ...] [--resume auto|never|URI]`

Distillation on the pretraining engine: parse the config, build the parts (a frozen teacher with
its heads, a smaller student on DeepSpeed, the student EMA), resume if asked, run the same loop
(`app/train/loop.py`), export the student EMA. Exit codes as pretraining: 0 done, 1 failed (e.g.
a non-finite loss), 2 bad config or teacher, 143 preempted after a checkpoint (retryable).

    distill.teacher = <store>/runs/<pretraining run>   export/backbone.pth + heads.pth + config.yaml,
                                                       or its LATEST checkpoint when not exported
    model           = the teacher (replaced by the teacher run's config.yaml `model` when present)
    student         = the student architecture (drop-path forced to 0: paper)
    dino / ibot     = the student heads (prototype counts always taken from the teacher's heads)

Export (`runs/<name>/export/`): backbone.pth (official keys, the student EMA), heads.pth (its
heads), config.yaml (`model:` = the student, so evaluation builds the right network),
summary.json, then `_SUCCESS`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import yaml

from app import storage
from app.config import Config, ConfigError, ModelConfig, config_from_dict, config_hash, dump_yaml, load_config
from app.models.hub import backbone_kwargs
from app.ssl.distill_meta_arch import build_student, head_from_state_dict

log = logging.getLogger("app.train")


class DistillSetupError(ValueError):
    """A one-line problem with the teacher, the student or the run name."""


def parse_args(argv: list[str]):
    """The pretraining arguments (`app/train/run.py`) under the stage name distill."""
    from app.train.run import parse_args as train_args

    return train_args(argv, stage="distill")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, args.set)
        if args.resume:
            cfg.train.resume = args.resume
        prepare_config(cfg)
    except (ConfigError, DistillSetupError) as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    return run(cfg)


def prepare_config(cfg: Config) -> Config:
    """Check the distillation settings and apply the paper's student rules in place: no masking
    (with `ibot_patches: all`, `ibot.mask_sample_probability = 0`), no drop-path; `distill.max_steps` replaces
    `train.max_steps` when set (one config file drives both pretraining and distillation)."""
    d = cfg.distill
    if not d.teacher:
        raise DistillSetupError("'distill.teacher' is empty: set it to a pretraining run URI "
                                "(<store>/runs/<name>)")
    if cfg.student is None:
        raise DistillSetupError("no 'student:' section: distillation needs the student architecture")
    if not 0.0 <= d.student_ema_momentum < 1.0:
        raise DistillSetupError(f"'distill.student_ema_momentum' must be in [0, 1), got {d.student_ema_momentum}")
    s = cfg.student
    if s.embed_dim and s.embed_dim % 64:
        raise DistillSetupError(f"'student.embed_dim' must be a multiple of 64 (64-d attention heads, "
                                f"as every DINOv2 size and the checkpoint loader assume), got {s.embed_dim}")
    teacher_run = storage.to_uri(d.teacher).rstrip("/")
    own_run = storage.join(storage.to_uri(cfg.run.store), "runs", cfg.run.name)
    if teacher_run == own_run:
        raise DistillSetupError(f"'run.name' ({cfg.run.name}) is the teacher's run: pick another "
                                f"(e.g. --set run.name={cfg.run.name}-distill)")
    cfg.distill.enabled = True
    if d.max_steps > 0:
        cfg.train.max_steps = d.max_steps
    if d.ibot_patches == "masked":  # the masks only pick iBOT targets; the student sees all
        if cfg.ibot.mask_sample_probability <= 0:
            raise DistillSetupError("'distill.ibot_patches: masked' needs 'ibot.mask_sample_probability' "
                                    "> 0 (the collate's masks pick the iBOT targets); or use 'all'")
    else:
        cfg.ibot.mask_sample_probability = 0.0
    s.drop_path_rate = 0.0
    return cfg


# -- networks ---------------------------------------------------------------------------------


@dataclass
class Teacher:
    network: Any  # SSLNetwork, frozen
    model: ModelConfig  # its architecture (what `model:` describes)
    source: str  # URI of the weights


def load_teacher(cfg: Config) -> Teacher:
    """The frozen teacher `distill.teacher` names: a run's export, else its LATEST checkpoint;
    a bare backbone file has no heads and is refused."""
    from app.eval.model_ref import latest_checkpoint, weights_from_checkpoint
    from app.models.convert import CheckpointError, heads_from_training_checkpoint, load_state_dict_file

    uri = storage.to_uri(cfg.distill.teacher).rstrip("/")
    model = cfg.model
    export = storage.join(uri, "export")
    try:
        if storage.exists(storage.join(export, "backbone.pth")):
            source = storage.join(export, "backbone.pth")
            backbone = load_state_dict_file(source)
            heads_uri = storage.join(export, "heads.pth")
            if not storage.exists(heads_uri):
                raise DistillSetupError(f"distill.teacher: {export} has no heads.pth (the DINO/iBOT "
                                        "heads the student learns to match)")
            heads = load_state_dict_file(heads_uri)
            cfg_uri = storage.join(export, "config.yaml")
            if storage.exists(cfg_uri):
                model = _model_of_run(storage.get_bytes(cfg_uri).decode(), cfg_uri)
        elif (ckpt := latest_checkpoint(uri)) is not None:
            backbone, heads, _ = weights_from_checkpoint(ckpt)
            source = ckpt
        elif storage.exists(uri):
            raw = load_state_dict_file(uri)
            try:
                heads = heads_from_training_checkpoint(raw)
            except CheckpointError:
                raise DistillSetupError(
                    f"distill.teacher: {uri} is a backbone without DINO/iBOT heads (official DINOv2 "
                    "releases ship none); distil from one of our pretraining runs (<store>/runs/<name>)"
                ) from None
            from app.models.convert import backbone_from_training_checkpoint

            backbone, source = backbone_from_training_checkpoint(raw), uri
        else:
            raise DistillSetupError(f"distill.teacher: {uri} is neither a run with export/ or "
                                    "checkpoints/LATEST nor a checkpoint file")
        return Teacher(_teacher_network(backbone, heads, model, source), model, source)
    except DistillSetupError:
        raise
    except (ValueError, storage.StorageError) as exc:  # CheckpointError, a head that is not one
        raise DistillSetupError(f"distill.teacher: {exc}") from None


def _model_of_run(text: str, where: str) -> ModelConfig:
    try:
        data = yaml.safe_load(text) or {}
        return config_from_dict({"model": data.get("model") or {}}, where).model
    except (yaml.YAMLError, ConfigError) as exc:
        raise DistillSetupError(f"{where}: cannot read the teacher's model section ({exc})") from None


def _teacher_network(backbone_sd: Mapping[str, torch.Tensor], heads: Mapping[str, Any],
                     model: ModelConfig, source: str):
    from app.models.convert import validate_official
    from app.models.vision_transformer import build_backbone
    from app.ssl.meta_arch import SSLNetwork

    backbone = build_backbone(model.arch, **backbone_kwargs(model))
    try:
        validate_official(backbone_sd, backbone)
    except ValueError as exc:
        raise DistillSetupError(f"distill.teacher: {source} does not match model '{model.arch}' "
                                f"({exc})") from None
    backbone.load_state_dict(dict(backbone_sd), strict=True)
    if "dino_head" not in heads:
        raise DistillSetupError(f"distill.teacher: {source}: heads have no dino_head")
    dino = head_from_state_dict(heads["dino_head"], f"{source} dino_head")
    ibot = head_from_state_dict(heads["ibot_head"], f"{source} ibot_head") if "ibot_head" in heads else None
    return SSLNetwork(backbone, dino, ibot)


# -- the run ----------------------------------------------------------------------------------


def run(cfg: Config) -> int:
    from app.train.run import run_guarded

    return run_guarded(_distill, cfg, (DistillSetupError,), what="distill")


def _distill(cfg: Config, d) -> int:
    from app.data.loader import MultiCropLoader
    from app.data.sampler import DataCursor
    from app.ssl.distill_meta_arch import DistillMetaArch, describe
    from app.ssl.meta_arch import LossWeights, register_zero3_external_params
    from app.ssl.param_groups import get_params_groups, group_layout
    from app.ssl.schedules import Schedules
    from app.train import checkpoint as ckpt
    from app.train.engine import build_clipper, build_engine, resolve_precision
    from app.train.loop import (PREEMPTED_EXIT_CODE, LoopConfig, StopFlag, sigterm_grace, run_summary,
                                sample_log_from_env, train_loop)
    from app.train.run import stage_tracking
    from app.train.step import TrainParts

    started = time.monotonic()
    stop = StopFlag(sigterm_grace(cfg.train.sigterm_grace_s))
    stop.install()
    teacher = load_teacher(cfg)
    cfg.model = teacher.model  # `model:` is the teacher; the loader's patch grid comes from it
    torch.manual_seed(cfg.run.seed)  # same initial student on every rank
    student = build_student(cfg, teacher.network)
    precision = resolve_precision(cfg, d.device)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        meta = DistillMetaArch(teacher.network, student, LossWeights.from_config(cfg),
                               cfg.model.patch_size, cfg.distill.ibot_patches).to_device(d.device, compute_dtype)
    except ValueError as exc:
        raise DistillSetupError(str(exc)) from None
    groups = get_params_groups(student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
                               decay_tokens=cfg.optim.decay_learned_tokens)
    layout = group_layout(groups)  # before DeepSpeed replaces the groups' params by partitions
    zero_stage = cfg.train.zero_stage
    if zero_stage == 3:
        register_zero3_external_params(student)
    engine = build_engine(student, groups, cfg, d.world_size, precision)
    schedules = student_ema_schedules(Schedules.from_config(cfg, d.world_size), cfg.distill)
    torch.manual_seed(cfg.run.seed * 1000 + d.rank + 1)

    start_step, cursor = 0, DataCursor()
    resume_uri = ckpt.resolve_resume(cfg.train.resume, cfg.run.store, cfg.run.name)
    if resume_uri:
        state = ckpt.load_checkpoint(engine, meta, resume_uri, cfg.run.name, d.rank, d.world_size,
                                     zero_stage, layout)
        if state.get("distill_teacher") != teacher.source:  # a moved store is legitimate
            log.warning("checkpoint %s was distilled from %s; continuing with %s", resume_uri,
                        state.get("distill_teacher"), teacher.source)
        start_step, cursor = int(state["step"]), DataCursor.from_dict(state["data_cursor"])
    loader = MultiCropLoader(cfg, d.rank, d.world_size, cursor, start_step=start_step)

    parts = TrainParts(engine, meta, schedules, zero_stage, compute_dtype, build_clipper(engine, cfg))
    lc = LoopConfig.from_config(cfg, d, zero_stage, schedules.total_iters,
                                {"config_hash": config_hash(cfg), "distill_teacher": teacher.source,
                                 "param_groups": layout},
                                stage="distill")
    sample_log = sample_log_from_env(d.rank)
    t_info, s_info = describe(teacher.network), describe(student)
    log.info("distill %s: teacher %s (%s, %.1fM backbone params) -> student %s d%d x%d (%.1fM), "
             "ZeRO-%d, %s, world %d, steps %d..%d", cfg.run.name, teacher.model.arch, teacher.source,
             t_info["backbone_params"] / 1e6, cfg.student.arch, s_info["embed_dim"], s_info["depth"],
             s_info["backbone_params"] / 1e6, zero_stage, precision, d.world_size, start_step,
             schedules.total_iters)
    with stage_tracking(cfg, "distill") as tracker:
        result = train_loop(parts, loader, lc, start_step, tracker.log_metrics, stop, sample_log)
        if result.preempted:
            return PREEMPTED_EXIT_CODE
        if d.rank == 0:
            summary = {
                **run_summary(cfg, result, d.world_size, zero_stage, precision, started),
                "teacher": {"source": teacher.source, "arch": teacher.model.arch, **t_info},
                "student": {"arch": cfg.student.arch, **s_info},
                "student_ema": student_ema_description(cfg),
                "ibot_patches": cfg.distill.ibot_patches,
            }
            export_student(meta, cfg, summary)
            tracker.log_summary(summary)
    return 0


def student_ema_schedules(schedules, distill):
    """The pretraining schedules with the momentum that moves the student EMA (the teacher is
    frozen; `train_step` passes it to `update_teacher`): the pretraining momentum schedule with
    `distill.student_ema: schedule`, `distill.student_ema_momentum` throughout with `constant`."""
    if distill.student_ema == "schedule":
        return schedules
    return dataclasses.replace(schedules, momentum=np.full(schedules.total_iters,
                                                           float(distill.student_ema_momentum)))


def student_ema_description(cfg: Config) -> str:
    if cfg.distill.student_ema == "schedule":
        return (f"schedule {cfg.teacher.momentum_teacher} -> {cfg.teacher.final_momentum_teacher} "
                "(cosine)")
    return f"constant {cfg.distill.student_ema_momentum}"


def exported_config(cfg: Config) -> Config:
    """The config written beside the export: `model:` is the student (what the weights are), the
    teacher's architecture is kept in `distill.teacher_arch`."""
    out = copy.deepcopy(cfg)
    out.distill.teacher_arch = cfg.model.arch
    out.model = copy.deepcopy(cfg.student)
    return out


def export_student(meta, cfg: Config, summary: dict[str, Any]) -> str:
    """Rank 0: the student EMA's backbone (official keys) and heads, config, summary, `_SUCCESS`
    last (the pipeline's done-marker)."""
    from app.train.loop import export_network

    return export_network(meta.student_ema, cfg.run.store, cfg.run.name,
                          dump_yaml(exported_config(cfg)), summary)


if __name__ == "__main__":
    sys.exit(main())
