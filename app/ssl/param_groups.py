"""Optimizer parameter groups of DINOv2: layer-wise lr decay, patch-embed lr multiplier, no
weight decay on biases / norms / LayerScale, and a flag on the heads' prototype layer
(`last_layer`) whose lr follows its own (frozen-at-start) schedule.

The learned tokens (`cls_token`, `pos_embed`, `mask_token`, `register_tokens`) are decayed, as in
the reference; `decay_tokens=False` (`optim.decay_learned_tokens: false`) exempts them, as timm
and MAE do (weight decay pulls the position embedding towards zero over a long schedule).

Parameter names are the official ones (`cls_token`, `pos_embed`, `patch_embed.*`, `blocks.{i}.*`,
`norm.*`, heads `mlp.*`, `last_layer.*`), optionally prefixed by `module.` and by the student's
ModuleDict keys `backbone.` / `dino_head.` / `ibot_head.`. Names without a head prefix are
backbone parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")
TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")
_BLOCK_ID = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def is_head_param(name: str) -> bool:
    return _strip(name).startswith(HEAD_PREFIXES)


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings/tokens, i + 1 for block i, num_layers + 1 for the rest (final norm,
    heads)."""
    name = _strip(name)
    if is_head_param(name):
        return num_layers + 1
    if any(t in name for t in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
        return 0
    match = _BLOCK_ID.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def lr_multiplier(name: str, layerwise_decay: float, num_layers: int, patch_embed_lr_mult: float) -> float:
    mult = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
    if "patch_embed" in name and not is_head_param(name):
        mult *= patch_embed_lr_mult
    return mult


def wd_multiplier(name: str, decay_tokens: bool = True) -> float:
    """0 for biases, norms and LayerScale `gamma` (and the learned tokens unless `decay_tokens`);
    1 otherwise."""
    name = _strip(name)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(".bias") or "norm" in name or "gamma" in name:
        return 0.0
    if leaf in TOKEN_NAMES and not decay_tokens:
        return 0.0
    return 1.0


def count_blocks(names: Iterable[str]) -> int:
    ids = {int(m.group(1)) for n in names if not is_head_param(n) and (m := _BLOCK_ID.search(_strip(n)))}
    return max(ids) + 1 if ids else 0


def get_params_groups(
    model: nn.Module,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    num_layers: int | None = None,
    with_names: bool = False,
    decay_tokens: bool = True,
) -> list[dict]:
    """Parameter groups fused by (lr_multiplier, wd_multiplier, is_last_layer).

    Each group: {"params": [...], "lr_multiplier": float, "wd_multiplier": float,
    "is_last_layer": bool} (plus "param_names" with `with_names=True`). Frozen parameters
    (requires_grad=False) are left out. `num_layers` defaults to the number of `blocks.{i}`.
    The multiplier of layer l is `layerwise_decay ** (num_layers + 1 - l)`.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if num_layers is None:
        num_layers = count_blocks(n for n, _ in named)
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in named:
        key = (
            lr_multiplier(name, layerwise_decay, num_layers, patch_embed_lr_mult),
            wd_multiplier(name, decay_tokens),
            "last_layer" in name,
        )
        group = groups.get(key)
        if group is None:
            group = {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2]}
            if with_names:
                group["param_names"] = []
            groups[key] = group
        group["params"].append(param)
        if with_names:
            group["param_names"].append(name)
    return list(groups.values())


def group_layout(param_groups: Iterable[dict]) -> list[list]:
    """The optimizer layout the groups make: [lr_multiplier, wd_multiplier, is_last_layer,
    numel] per non-empty group. Saved in checkpoints: the optimizer state of one layout cannot be
    loaded into another (e.g. after changing `optim.decay_learned_tokens`)."""
    out = []
    for g in param_groups:
        params = list(g["params"])
        if params:
            out.append([float(g.get("lr_multiplier", 1.0)), float(g.get("wd_multiplier", 1.0)),
                        bool(g.get("is_last_layer", False)), int(sum(p.numel() for p in params))])
    return out


def apply_schedules(param_groups: Iterable[dict], lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier and
    weight_decay = wd * wd_multiplier (groups without multipliers count as 1, not last layer).
    `param_groups`: an optimizer's `param_groups` (torch's, or the one DeepSpeed wraps)."""
    for group in param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
