"""What `--model` names: a backbone file, or a run whose export (or latest checkpoint) holds one.

    ref = resolve_model("file:///.../runs/demo")      # export/backbone.pth, else LATEST checkpoint
    ref = resolve_model("/models/dinov2_vits14_pretrain.pth")
    ref.model, ref.arch, ref.source

Run layout (DESIGN.md §3): `runs/<run>/export/{backbone.pth,heads.pth,config.yaml}` and
`runs/<run>/checkpoints/step-XXXXXXXX/teacher.pt` + `checkpoints/LATEST`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import yaml
from torch import Tensor

from app import storage

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "LATEST"
CHECKPOINT_MODEL_FILE = "teacher.pt"  # app/train/checkpoint.py: meta-arch state dict (rank 0)
# Which network of a checkpoint is the model: a distilled run's student EMA when present (the
# paper exports the student's EMA), otherwise the EMA teacher of pretraining.
MODEL_PREFERENCE = ("student_ema", "ema_student", "model_ema", "teacher")


class ModelNotFound(ValueError):
    """`--model` names neither a backbone file nor a run with an export or checkpoint."""


@dataclass
class ModelRef:
    model: Any  # VisionTransformer in eval mode
    source: str  # URI of the file the weights came from (a checkpoint dir for checkpoints)
    run_uri: str | None  # the run, when --model named one
    arch: str  # vit_small, vit_small_reg4, d256x6 ... (see arch_name)


def arch_name(model) -> str:
    """Our size name (`vit_small`, `vit_base_reg4`) or `vit_<dim>d<depth>` for other shapes."""
    from app.models.vision_transformer import ARCHS

    name = f"vit_{model.embed_dim}d{model.depth}"
    for arch, spec in ARCHS.items():
        if spec["embed_dim"] == model.embed_dim and spec["depth"] == model.depth:
            name = arch
            break
    regs = getattr(model, "num_register_tokens", 0)
    return f"{name}_reg{regs}" if regs else name


def is_run_uri(uri: str) -> bool:
    base = storage.to_uri(uri).rstrip("/")
    return (storage.exists(storage.join(base, EXPORT_DIR, "backbone.pth"))
            or storage.exists(storage.join(base, CHECKPOINTS_DIR, LATEST)))


def latest_checkpoint(run_uri: str) -> str | None:
    """URI of the checkpoint directory LATEST names, or None."""
    base = storage.to_uri(run_uri).rstrip("/")
    latest = storage.join(base, CHECKPOINTS_DIR, LATEST)
    if not storage.exists(latest):
        return None
    tag = storage.get_bytes(latest).decode().strip()
    return storage.join(base, CHECKPOINTS_DIR, tag)


def _model_prefix(raw: Mapping[str, Any]) -> str:
    tops = {str(k).split(".")[0] for k in raw}
    for name in MODEL_PREFERENCE:
        if name in tops:
            return name
    raise ModelNotFound(f"checkpoint has none of {', '.join(MODEL_PREFERENCE)} "
                        f"(top-level names: {', '.join(sorted(tops)[:8])})")


def load_checkpoint_model_state(checkpoint_dir: str) -> dict[str, Any]:
    uri = storage.join(checkpoint_dir, CHECKPOINT_MODEL_FILE)
    if not storage.exists(uri):
        raise ModelNotFound(f"{checkpoint_dir}: no {CHECKPOINT_MODEL_FILE} in the checkpoint")
    return torch.load(io.BytesIO(storage.get_bytes(uri)), map_location="cpu", weights_only=True)


def weights_from_checkpoint(checkpoint_dir: str) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], str]:
    """(official-schema backbone, {"dino_head": sd, "ibot_head": sd?}, prefix used)."""
    from app.models.convert import backbone_from_training_checkpoint, heads_from_training_checkpoint

    raw = load_checkpoint_model_state(checkpoint_dir)
    prefix = _model_prefix(raw)
    backbone = backbone_from_training_checkpoint(raw, prefix=f"{prefix}.backbone.")
    try:
        heads = heads_from_training_checkpoint(raw, model=prefix)
    except ValueError:
        heads = {}
    return backbone, heads, prefix


def interpolation_from_config(config_yaml: str | None) -> dict[str, Any]:
    """Pos-embed interpolation settings from a run's config.yaml (not stored in the weights):
    the student section for a distillation run, the model section otherwise."""
    if not config_yaml:
        return {}
    try:
        data = yaml.safe_load(config_yaml) or {}
    except yaml.YAMLError:
        return {}
    section = data.get("model") or {}
    if (data.get("distill") or {}).get("enabled") and data.get("student"):
        section = data["student"]
    out = {}
    if "interpolate_offset" in section:
        out["interpolate_offset"] = float(section["interpolate_offset"])
    if "interpolate_antialias" in section:
        out["interpolate_antialias"] = bool(section["interpolate_antialias"])
    return out


def model_from_state_dict(sd: Mapping[str, Tensor], **overrides):
    from app.models.convert import infer_backbone_kwargs, validate_official
    from app.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**{**infer_backbone_kwargs(sd), **overrides})
    validate_official(sd, model)
    model.load_state_dict(dict(sd), strict=True)
    return model.eval()


def resolve_model(uri: str, arch: str | None = None) -> ModelRef:
    """Load the backbone `uri` names (see module docstring); strict loading throughout."""
    from app.models.convert import load_backbone

    if not uri:
        raise ModelNotFound("no model given (--model or eval.model)")
    target = storage.to_uri(uri).rstrip("/")
    export = storage.join(target, EXPORT_DIR, "backbone.pth")
    if storage.exists(export):
        cfg_uri = storage.join(target, EXPORT_DIR, "config.yaml")
        cfg_text = storage.get_bytes(cfg_uri).decode() if storage.exists(cfg_uri) else None
        model = load_backbone(export, arch=arch, **interpolation_from_config(cfg_text))
        return ModelRef(model, export, target, arch_name(model))
    ckpt = latest_checkpoint(target)
    if ckpt is not None:
        backbone, _, prefix = weights_from_checkpoint(ckpt)
        log.info("model: %s has no export; using %s of checkpoint %s", target, prefix, ckpt)
        model = model_from_state_dict(backbone)
        return ModelRef(model, ckpt, target, arch_name(model))
    if storage.exists(target):
        # `<run>/export/backbone.pth` (what the pipeline passes): its config.yaml sits beside it.
        sibling = target.rsplit("/", 1)[0] + "/config.yaml"
        cfg_text = storage.get_bytes(sibling).decode() if storage.exists(sibling) else None
        model = load_backbone(target, arch=arch, **interpolation_from_config(cfg_text))
        return ModelRef(model, target, None, arch_name(model))
    raise ModelNotFound(f"{uri}: neither a backbone file nor a run with {EXPORT_DIR}/backbone.pth "
                        f"or {CHECKPOINTS_DIR}/{LATEST}")
