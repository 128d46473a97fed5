"""The DINOv2 meta-architecture: a student and its EMA teacher, and the three losses.

One training step reads as four calls (`app/train/step.py`):

    teacher_out = meta.get_teacher_output(batch, teacher_temp)     # no grad, 2 unmasked globals
    student_out = meta.get_student_output(student, batch)          # masked globals + locals
    losses      = meta.compute_losses(student_out, teacher_out, batch)
    ... engine.backward(losses["total_loss"]); engine.step() ...
    meta.update_teacher(student_module, momentum)

`SSLNetwork` (backbone + DINO head + optional separate iBOT head) is used for both networks, so
state-dict keys are `backbone.*`, `dino_head.*`, `ibot_head.*` as in official training checkpoints.
The student is given to DeepSpeed; the teacher is a plain replicated module that lives here,
never reaches the optimizer and is updated by EMA under every ZeRO stage (`update_teacher`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from app.ssl.centering import sinkhorn_knopp, softmax_center_teacher, update_center
from app.ssl.dino_loss import dino_multicrop_loss
from app.ssl.ibot_loss import ibot_patch_loss_masked
from app.ssl.koleo_loss import koleo_loss

N_GLOBAL_CROPS = 2
CENTER_MOMENTUM = 0.9  # official center EMA momentum for softmax centering
STUDENT_TEMP = 0.1


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ iBOT head when `ibot.separate_head`).

    `forward` is the student's pass so that DeepSpeed's hooks (ZeRO-3 parameter gathering) run on
    it; the teacher calls `forward_teacher` directly (it is a plain module).
    """

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops: Tensor, local_crops: Tensor, masks: Tensor,
                mask_indices: Tensor) -> dict[str, Tensor]:
        """Student pass over masked global crops and unmasked local crops.

        global_crops [2B, 3, H, W] crop-major; local_crops [n_l*B, 3, h, w] (may be empty);
        masks [2B, N] bool; mask_indices [M] flat indices into masks.
        Returns global_cls [2B, D] (pre-head, for KoLeo), global_logits [2B, K],
        local_logits [n_l*B, K] and masked_patch_logits [M, K_ibot].
        """
        has_local = local_crops.numel() > 0
        crops = [global_crops] + ([local_crops] if has_local else [])
        outs = self.backbone.forward_features_list(crops, [masks] + ([None] if has_local else []))
        global_cls = outs[0]["x_norm_clstoken"]
        local_cls = outs[1]["x_norm_clstoken"] if has_local else global_cls[:0]
        patches = outs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        n_l, n_g = local_cls.shape[0], global_cls.shape[0]
        if self.ibot_head is None:
            # One head call over everything, like the official implementation.
            logits = self.dino_head(torch.cat([local_cls, global_cls, patches]))
            local_logits, global_logits, patch_logits = logits.split([n_l, n_g, patches.shape[0]])
        else:
            local_logits, global_logits = self.dino_head(torch.cat([local_cls, global_cls])).split([n_l, n_g])
            patch_logits = self.ibot_head(patches)
        return {"global_cls": global_cls, "global_logits": global_logits,
                "local_logits": local_logits, "masked_patch_logits": patch_logits}

    @torch.no_grad()
    def forward_teacher(self, global_crops: Tensor, mask_indices: Tensor) -> dict[str, Tensor]:
        """Teacher pass on the unmasked global crops [2B, 3, H, W].

        Returns cls_logits [2B, K] (crop-major, not swapped: the loss skips same-view pairs) and
        masked_patch_logits [M, K_ibot] at the positions the student sees masked.
        """
        out = self.backbone.forward_features(global_crops)
        cls = out["x_norm_clstoken"]
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        if self.ibot_head is None:
            logits = self.dino_head(torch.cat([cls, patches]))
            cls_logits, patch_logits = logits.split([cls.shape[0], patches.shape[0]])
        else:
            cls_logits, patch_logits = self.dino_head(cls), self.ibot_head(patches)
        return {"cls_logits": cls_logits, "masked_patch_logits": patch_logits}


def build_network(cfg: Any) -> SSLNetwork:
    """The student network from `cfg.model` / `cfg.dino` / `cfg.ibot` (the teacher copies it)."""
    from app.models.heads import DINOHead
    from app.models.hub import backbone_kwargs
    from app.models.vision_transformer import build_backbone

    backbone = build_backbone(cfg.model.arch, **backbone_kwargs(cfg.model))
    dim = backbone.embed_dim
    d = cfg.dino
    dino_head = DINOHead(dim, d.head_n_prototypes, nlayers=d.head_nlayers,
                         hidden_dim=d.head_hidden_dim, bottleneck_dim=d.head_bottleneck_dim)
    ibot_head = None
    if cfg.ibot.separate_head:
        i = cfg.ibot
        ibot_head = DINOHead(dim, i.head_n_prototypes, nlayers=i.head_nlayers,
                             hidden_dim=i.head_hidden_dim, bottleneck_dim=i.head_bottleneck_dim)
    return SSLNetwork(backbone, dino_head, ibot_head)


@dataclass
class LossWeights:
    dino: float = 1.0
    ibot: float = 1.0
    koleo: float = 0.1
    centering: str = "centering"  # centering | sinkhorn_knopp

    @classmethod
    def from_config(cls, cfg: Any) -> "LossWeights":
        return cls(cfg.dino.loss_weight, cfg.ibot.loss_weight, cfg.dino.koleo_loss_weight,
                   cfg.train.centering)


def frozen_copy(net: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A deep copy in `dtype` that takes no gradients and stays in eval mode."""
    out = copy.deepcopy(net).to(dtype)
    out.requires_grad_(False)
    out.eval()
    return out


def register_centers(module: nn.Module, heads: SSLNetwork) -> None:
    """The teacher's softmax-centering buffers, sized by the DINO and iBOT head outputs."""
    module.register_buffer("dino_center", torch.zeros(1, heads.dino_head.out_dim))
    module.register_buffer("ibot_center", torch.zeros(1, (heads.ibot_head or heads.dino_head).out_dim))


class SSLMetaArch(nn.Module):
    """Holds the EMA teacher and the centering state; the student is passed in (DeepSpeed owns it).

    Buffers `dino_center [1, K]` and `ibot_center [1, K_ibot]` are the softmax-centering EMAs
    (unused with Sinkhorn-Knopp); they are part of `state_dict()` and so of every checkpoint.
    """

    def __init__(self, student: SSLNetwork, weights: LossWeights, teacher_dtype=torch.float32):
        super().__init__()
        self.weights = weights
        self.teacher = frozen_copy(student, teacher_dtype)  # no drop-path in the teacher, ever
        register_centers(self, student)

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()
        return self

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def get_teacher_output(self, batch: dict, teacher_temp: float,
                           autocast_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Teacher target probabilities: dino_probs [2B, K], ibot_probs [M, K_ibot] (fp32)."""
        with _autocast(batch["collated_global_crops"].device, autocast_dtype):
            out = self.teacher.forward_teacher(batch["collated_global_crops"].to(self._teacher_dtype()),
                                               batch["mask_indices_list"])
        return teacher_targets(self, out["cls_logits"].float(), out["masked_patch_logits"].float(),
                               teacher_temp, batch["n_masked_patches"], self.weights.centering)

    def get_student_output(self, student: Callable[..., dict], batch: dict,
                           dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Run the student (the DeepSpeed engine or the bare module) on the batch."""
        g, l = batch["collated_global_crops"], batch["collated_local_crops"]
        if dtype is not None:
            g, l = g.to(dtype), l.to(dtype)
        return student(g, l, batch["collated_masks"], batch["mask_indices_list"])

    def compute_losses(self, student_out: dict, teacher_out: dict, batch: dict) -> dict[str, Tensor]:
        """Loss terms (fp32 scalars) and `total_loss` with the official scalings:
        DINO averaged over the 18 crop pairs, iBOT per-image-weighted over 2B images, and
        KoLeo summed over the two global crops (never across them)."""
        n_images = batch["collated_masks"].shape[0]
        return ssl_losses(student_out, teacher_out, batch["masks_weight"], n_images, self.weights)

    # -- EMA ------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self, student: nn.Module, momentum: float, zero3: bool = False,
                       gather_numel: int = 50_000_000) -> None:
        """teacher = m * teacher + (1 - m) * student, parameter by parameter.

        ZeRO-0/1/2: the student's module parameters are whole on every rank. ZeRO-3: they are
        partitioned, so they are gathered read-only (`modifier_rank=None`: nothing is written
        back) in chunks of about `gather_numel` elements to bound the extra memory.
        The teacher is replicated, so every rank computes the same update.
        """
        ema_update(self.teacher, student, momentum, zero3, gather_numel)

    def _teacher_dtype(self) -> torch.dtype:
        return next(self.teacher.parameters()).dtype


@torch.no_grad()
def teacher_targets(centers: nn.Module, cls_logits: Tensor, patch_logits: Tensor, teacher_temp: float,
                    n_patches: Tensor, centering: str) -> dict[str, Tensor]:
    """dino_probs [2B, K] and ibot_probs [M, K_ibot] (fp32) from fp32 teacher logits, by
    Sinkhorn-Knopp or by softmax centering with `centers.dino_center` / `centers.ibot_center`
    (moved here, after the targets used them: the official order). `n_patches` [1]: this rank's M.
    """
    if centering == "sinkhorn_knopp":
        return {"dino_probs": sinkhorn_knopp(cls_logits, teacher_temp),
                "ibot_probs": sinkhorn_knopp(patch_logits, teacher_temp, n_samples=n_patches)}
    dino_probs = softmax_center_teacher(cls_logits, centers.dino_center, teacher_temp)
    ibot_probs = softmax_center_teacher(patch_logits, centers.ibot_center, teacher_temp)
    centers.dino_center.copy_(update_center(centers.dino_center, cls_logits, CENTER_MOMENTUM))
    # iBOT: the mean over this rank's target patches, averaged over ranks (official).
    local_mean = patch_logits.mean(0, keepdim=True) if patch_logits.shape[0] else \
        torch.zeros_like(centers.ibot_center)
    centers.ibot_center.copy_(update_center(centers.ibot_center, local_mean, CENTER_MOMENTUM))
    return {"dino_probs": dino_probs, "ibot_probs": ibot_probs}


def ssl_losses(student_out: dict, teacher_out: dict, patch_weight: Tensor, n_images: int,
               w: "LossWeights") -> dict[str, Tensor]:
    """DINO + iBOT + KoLeo terms and `total_loss`, shared by pretraining and distillation.

    patch_weight [M]: each selected patch's 1/n(its image); n_images = 2B global crops.
    """
    dino = dino_multicrop_loss(student_out["global_logits"], student_out["local_logits"],
                               teacher_out["dino_probs"], N_GLOBAL_CROPS, STUDENT_TEMP)
    ibot = ibot_patch_loss_masked(student_out["masked_patch_logits"], teacher_out["ibot_probs"],
                                  patch_weight, n_images, STUDENT_TEMP)
    koleo = sum(koleo_loss(c) for c in student_out["global_cls"].chunk(N_GLOBAL_CROPS))
    losses = {
        "dino_local_crops_loss": dino["dino_local_crops_loss"],
        "dino_global_crops_loss": dino["dino_global_crops_loss"],
        "ibot_loss": ibot,
        "koleo_loss": koleo,
    }
    losses["total_loss"] = (
        w.dino * (losses["dino_local_crops_loss"] + losses["dino_global_crops_loss"])
        + w.ibot * ibot + w.koleo * koleo
    )
    return losses


@torch.no_grad()
def ema_update(target: nn.Module, student: nn.Module, momentum: float, zero3: bool = False,
               gather_numel: int = 50_000_000) -> None:
    """target = m * target + (1 - m) * student, parameter by parameter (the teacher in
    pretraining, the student EMA in distillation). Under ZeRO-3 the partitioned student is
    gathered read-only in chunks of about `gather_numel` elements."""
    pairs = _matched_parameters(student, target)
    if not zero3:
        _ema([t for _, t in pairs], [s for s, _ in pairs], momentum)
        return
    import deepspeed

    chunk: list[tuple[Tensor, Tensor]] = []
    size = 0
    for s, t in pairs:
        chunk.append((s, t))
        size += getattr(s, "ds_numel", s.numel())
        if size >= gather_numel:
            _ema_gathered(deepspeed, chunk, momentum)
            chunk, size = [], 0
    if chunk:
        _ema_gathered(deepspeed, chunk, momentum)


def _matched_parameters(student: nn.Module, teacher: nn.Module) -> list[tuple[Tensor, Tensor]]:
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        missing = sorted(set(s_params) ^ set(t_params))[:5]
        raise RuntimeError(f"student and teacher parameters differ: {missing}")
    return [(s_params[k], t_params[k]) for k in t_params]


def _ema(teacher: list[Tensor], student: list[Tensor], m: float) -> None:
    student = [s.detach().to(t.dtype) for s, t in zip(student, teacher)]
    torch._foreach_mul_(teacher, m)
    torch._foreach_add_(teacher, student, alpha=1.0 - m)


def _ema_gathered(deepspeed, chunk: list[tuple[Tensor, Tensor]], m: float) -> None:
    with deepspeed.zero.GatheredParameters([s for s, _ in chunk], modifier_rank=None):
        _ema([t for _, t in chunk], [s for s, _ in chunk], m)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def register_zero3_external_params(student: SSLNetwork) -> None:
    """ZeRO-3 gathers a module's own parameters when that module is *called*. The student calls
    `backbone.forward_features_list`, not `backbone(...)`, so the backbone's direct parameters
    (cls_token, pos_embed, mask_token, register_tokens) are registered on the student module.

    Likewise a block without drop-path adds its LayerScale as `addcmul(x, y, ls.gamma)`, reading
    the parameter without calling the `ls` module; unregistered, DeepSpeed's fetch trace depends on
    when the parameter happened to be gathered and a resumed run stops with "tracing error ...
    expected ls1.gamma". Declaring the gammas as parameters of their block fixes every pass."""
    import deepspeed

    for p in student.backbone.parameters(recurse=False):
        deepspeed.zero.register_external_parameter(student, p)
    for block in getattr(student.backbone, "blocks", []):
        for name in ("ls1", "ls2"):
            gamma = getattr(getattr(block, name, None), "gamma", None)
            if isinstance(gamma, nn.Parameter):
                deepspeed.zero.register_external_parameter(block, gamma)
