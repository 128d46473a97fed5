"""Checkpoint conversion: official DINOv2 backbones, training checkpoints, exports.

Our backbone state dict *is* the official key schema, so `to_official` / `from_official` only
validate. Training checkpoints (official `teacher_checkpoint.pth`, FSDP `model_*.pth`, ours) nest
the backbone under `teacher.backbone.` / `student.backbone.` / `backbone.`, may carry DDP
`module.` segments, and with `block_chunks > 0` name blocks `blocks.{chunk}.{i}.*`.
"""

from __future__ import annotations

import io
import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from app.models.layers import swiglu_hidden_dim

_BLOCK_PARTS = (
    r"norm1\.(weight|bias)|attn\.qkv\.(weight|bias)|attn\.proj\.(weight|bias)|ls1\.gamma|"
    r"norm2\.(weight|bias)|mlp\.(fc1|fc2|w12|w3)\.(weight|bias)|ls2\.gamma"
)
_OFFICIAL_KEY = re.compile(
    r"^(cls_token|pos_embed|register_tokens|mask_token|patch_embed\.proj\.(weight|bias)|"
    r"norm\.(weight|bias)|blocks\.\d+\.(" + _BLOCK_PARTS + r"))$"
)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
# Top-level containers whose name is not part of the key path.
_WRAPPERS = ("model", "state_dict", "module")
ARCH_BY_DIM = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant2"}


class CheckpointError(ValueError):
    """A state dict does not match what the caller expects; the message lists the keys."""


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def validate_official(state_dict: Mapping[str, Tensor],
                      reference: Mapping[str, Tensor] | nn.Module | None = None) -> None:
    """Raise `CheckpointError` unless every key is in the official DINOv2 backbone schema and,
    with `reference` (a model or state dict), the keys and shapes match it exactly."""
    unknown = sorted(k for k in state_dict if not _OFFICIAL_KEY.match(k))
    if unknown:
        raise CheckpointError(f"keys outside the official DINOv2 backbone schema: {_describe(unknown)}")
    if reference is None:
        return
    ref = reference.state_dict() if isinstance(reference, nn.Module) else reference
    missing = sorted(set(ref) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ref))
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(ref[k].shape)}"
                    for k in set(ref) & set(state_dict) if state_dict[k].shape != ref[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_describe(shapes)}")
    if problems:
        raise CheckpointError("; ".join(problems))


def to_official(state_dict: Mapping[str, Tensor] | nn.Module) -> dict[str, Tensor]:
    """Our backbone (model or state dict) -> official-schema state dict (detached, on CPU)."""
    sd = state_dict.state_dict() if isinstance(state_dict, nn.Module) else state_dict
    sd = {_strip_module(k): v for k, v in sd.items()}
    validate_official(sd)
    return {k: v.detach().cpu() for k, v in sd.items()}


def from_official(state_dict: Mapping[str, Tensor],
                  reference: Mapping[str, Tensor] | nn.Module | None = None) -> dict[str, Tensor]:
    """Official-schema state dict -> ours (same keys), validated against `reference` if given."""
    sd = dict(state_dict)
    validate_official(sd, reference)
    return sd


def _strip_module(key: str) -> str:
    return ".".join(p for p in key.split(".") if p != "module")


def _flatten_checkpoint(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """Nested checkpoint dicts -> flat `a.b.c` keys; wrapper containers (`model`, ...) dropped."""
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, Mapping):
            inner = prefix if k in _WRAPPERS else f"{prefix}{k}."
            out.update(_flatten_checkpoint(v, inner))
        elif isinstance(v, Tensor):
            out[_strip_module(prefix + k)] = v
    return out


def _unchunk(key: str) -> str:
    m = _CHUNKED_BLOCK.match(key)
    # `blocks.{i}.norm1...` has one number; two in a row is the chunked layout.
    return f"blocks.{m.group(1)}.{m.group(2)}" if m else key


def _select(flat: dict[str, Tensor], prefixes: tuple[str, ...], what: str) -> tuple[str, dict[str, Tensor]]:
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if sub:
            return prefix, sub
    tops = sorted({k.split(".")[0] for k in flat})
    raise CheckpointError(f"no {what} found under prefixes {', '.join(prefixes)}; "
                          f"top-level names are: {_describe(tops)}")


def backbone_from_training_checkpoint(checkpoint: Mapping[str, Any], prefix: str | None = None) -> dict[str, Tensor]:
    """Training checkpoint -> official-schema backbone state dict.

    `prefix=None` tries `teacher.backbone.`, then `backbone.`, then `student.backbone.` (the
    teacher is the model DINOv2 evaluates and exports). Chunked block keys are renumbered flat.
    """
    flat = _flatten_checkpoint(checkpoint)
    prefixes = (prefix,) if prefix else ("teacher.backbone.", "backbone.", "student.backbone.")
    _, sub = _select(flat, prefixes, "backbone")
    sd = {_unchunk(k): v for k, v in sub.items()}
    validate_official(sd)
    return sd


def heads_from_training_checkpoint(checkpoint: Mapping[str, Any], model: str = "teacher") -> dict[str, dict[str, Tensor]]:
    """Training checkpoint -> `{"dino_head": sd, "ibot_head": sd}` (iBOT only if separate)."""
    flat = _flatten_checkpoint(checkpoint)
    heads = {}
    for name in ("dino_head", "ibot_head"):
        prefixes = (f"{model}.{name}.", f"{name}.") if model else (f"{name}.",)
        try:
            _, heads[name] = _select(flat, prefixes, name)
        except CheckpointError:
            if name == "dino_head":
                raise
    return heads


def export_backbone(model: nn.Module | Mapping[str, Tensor], uri: str) -> None:
    """Write the backbone's official-schema state dict with `torch.save`, atomically."""
    from app import storage

    buf = io.BytesIO()
    torch.save(to_official(model), buf)
    storage.put_bytes(uri, buf.getvalue())


def load_state_dict_file(uri: str) -> dict[str, Any]:
    """`torch.load` of a local path, `file://` or `s3://` object, onto the CPU, tensors only."""
    from app import storage

    data = storage.get_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors carry no file name
        raise CheckpointError(f"{uri}: not a readable torch checkpoint ({exc.__class__.__name__}: {exc})") from None


def infer_backbone_kwargs(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """VisionTransformer keywords implied by an official-schema state dict's keys and shapes.

    Head count is not stored in the weights: 64-d heads are assumed (true for every DINOv2
    size). Registers imply the official register models' interpolation (antialias, offset 0).
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in sd:
            raise CheckpointError(f"cannot infer the architecture: key '{key}' is missing")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n = sd["pos_embed"].shape[1] - 1
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise CheckpointError(f"pos_embed has {n} patch positions, not a square grid")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise CheckpointError(f"block indices are not 0..depth-1: {sorted(blocks)[:8]}")
    kw: dict[str, Any] = dict(
        embed_dim=dim, depth=len(blocks), num_heads=max(dim // 64, 1), patch_size=patch,
        img_size=grid * patch, qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
    )
    if "blocks.0.mlp.w12.weight" in sd:
        hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
        ratio = hidden * 3 / 2 / dim
        if swiglu_hidden_dim(int(dim * ratio)) != hidden:
            raise CheckpointError(f"SwiGLU hidden width {hidden} is not reachable from embed_dim {dim}")
        kw.update(ffn="swiglu", mlp_ratio=ratio, ffn_bias="blocks.0.mlp.w12.bias" in sd)
    else:
        kw.update(ffn="mlp", mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                  ffn_bias="blocks.0.mlp.fc1.bias" in sd)
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    kw["num_register_tokens"] = regs
    if regs:
        kw.update(interpolate_antialias=True, interpolate_offset=0.0)
    return kw


def load_backbone(path_or_uri: str, arch: str | None = None, **kw):
    """Build a backbone and load an official, exported or training checkpoint (strict).

    With `arch=None` the architecture is inferred from the weights; `kw` override either way.
    Returns the model in eval mode.
    """
    from app.models.vision_transformer import build_backbone, VisionTransformer

    raw = load_state_dict_file(path_or_uri)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path_or_uri}: expected a state dict, got {type(raw).__name__}")
    flat = _flatten_checkpoint(raw)
    if all(_OFFICIAL_KEY.match(k) for k in flat):
        sd = flat
    else:
        try:
            sd = backbone_from_training_checkpoint(raw)
        except CheckpointError as exc:
            raise CheckpointError(f"{path_or_uri}: {exc}") from None
    inferred = infer_backbone_kwargs(sd)
    if arch is None:
        model = VisionTransformer(**{**inferred, **kw})
    else:
        shape_kw = {k: inferred[k] for k in ("patch_size", "img_size", "num_register_tokens")}
        model = build_backbone(arch, **{**shape_kw, **kw})
    try:
        validate_official(sd, model)
    except CheckpointError as exc:
        raise CheckpointError(f"{path_or_uri}: {exc}") from None
    model.load_state_dict(sd, strict=True)
    return model.eval()
