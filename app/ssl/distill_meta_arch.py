"""Distillation meta-architecture: a frozen teacher with its heads, a smaller student, and the
student's EMA (the model that is exported).

It offers the same four calls as `SSLMetaArch`, so `app/train/step.py::train_step` runs it
unchanged:

    teacher_out = meta.get_teacher_output(batch, teacher_temp)   # frozen teacher, 2 global crops
    student_out = meta.get_student_output(student, batch)        # unmasked globals + locals
    losses      = meta.compute_losses(student_out, teacher_out, batch)
    ... engine.backward(losses["total_loss"]); engine.step() ...
    meta.update_teacher(student_module, momentum)                # moves the student EMA

Paper (DINOv2 §5, quoted in dinov2 issue #114): the teacher is frozen, the student has no masking
and no stochastic depth, the iBOT loss is applied on the two global crops, and "a spare EMA of the
student" is the final model. Which patches are iBOT targets is `distill.ibot_patches`:
- `all` (default): *every* patch token of both global crops (each image's patches weigh 1/N, the
  sum is divided by the 2B global-crop images, as in pretraining); the DINOv2 maintainers describe
  this choice (MIM loss on all tokens, issue #176), and it uses every target the teacher computes.
- `masked`: the collate's masked subset (drawn with the `ibot.mask_*` settings, weighted per image
  as in pretraining) of the student's patches, the student still seeing the whole image; this is
  what the distillation code released with DINOv3 does, and costs the heads ~1/5 of `all`.
The DINO loss uses the same crop pairs as pretraining (same-view pairs skipped), and KoLeo acts on
the student's global CLS tokens.

`state_dict()` holds the student EMA (`student_ema.backbone.*`, `student_ema.dino_head.*`, ...)
and the centering buffers, never the teacher: the teacher is frozen and is reloaded from its run,
so checkpoints stay small (a ViT-g teacher would add ~4.5 GB to each). `app/eval/model_ref.py`
picks the `student_ema.` prefix from a checkpoint's `teacher.pt`.

The networks: `build_student` (a `student:` ModelConfig, optionally narrower/shallower through
`embed_dim` / `depth`, with heads over the teacher's prototypes) and `head_from_state_dict` (a
teacher head rebuilt from its weights alone).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor, nn

from app.ssl.meta_arch import LossWeights, SSLNetwork, frozen_copy, register_centers
from app.ssl.meta_arch import ema_update, ssl_losses, teacher_targets  # shared with pretraining

if TYPE_CHECKING:
    from app.config import Config


def all_patch_targets(n_images: int, n_patches: int, device: torch.device) -> dict[str, Tensor]:
    """The "no masking" counterpart of the collate's mask fields, for `n_images` global crops of
    `n_patches` patches each: masks [n_images, N] all False (the student sees every patch),
    patch_indices [n_images * N] (every patch is an iBOT target) and patch_weight
    [n_images * N] = 1/N (each image counts once, as in pretraining)."""
    return {
        "masks": torch.zeros(n_images, n_patches, dtype=torch.bool, device=device),
        "patch_indices": torch.arange(n_images * n_patches, device=device),
        "patch_weight": torch.full((n_images * n_patches,), 1.0 / n_patches, device=device),
    }


def _n_patches(batch: dict, patch_size: int) -> int:
    h, w = batch["collated_global_crops"].shape[-2:]
    return (h // patch_size) * (w // patch_size)


IBOT_PATCHES = ("all", "masked")


def ibot_targets(batch: dict, patch_size: int, ibot_patches: str) -> dict[str, Tensor]:
    """The iBOT target patches of a batch: patch_indices [M] into the flattened [2B * N] global
    crop patches, patch_weight [M] (1 / targets of its image) and n_targets [1] (local M).
    `all`: every patch; `masked`: the collate's masked subset (the student still sees it)."""
    if ibot_patches == "masked":
        return {"patch_indices": batch["mask_indices_list"], "patch_weight": batch["masks_weight"],
                "n_targets": batch["n_masked_patches"]}
    crops = batch["collated_global_crops"]
    t = all_patch_targets(crops.shape[0], _n_patches(batch, patch_size), crops.device)
    t["n_targets"] = torch.full((1,), t["patch_indices"].numel(), dtype=torch.long)
    return t


class DistillMetaArch(nn.Module):
    """Frozen teacher (not a registered submodule: kept out of `state_dict`), the student EMA and
    the softmax-centering buffers `dino_center [1, K]`, `ibot_center [1, K_ibot]`.

    `student` is only used to initialise the EMA; the live student belongs to DeepSpeed.
    """

    def __init__(self, teacher: SSLNetwork, student: SSLNetwork, weights: LossWeights,
                 patch_size: int, ibot_patches: str = "all"):
        super().__init__()
        check_compatible(teacher, student)
        if ibot_patches not in IBOT_PATCHES:
            raise ValueError(f"ibot_patches must be one of {', '.join(IBOT_PATCHES)}, got {ibot_patches!r}")
        self.weights = weights
        self.patch_size = patch_size
        self.ibot_patches = ibot_patches
        teacher.requires_grad_(False)
        teacher.eval()  # no drop-path, ever
        self.__dict__["teacher"] = teacher  # plain attribute: not saved, not moved by .to()
        self.student_ema = frozen_copy(student)
        register_centers(self, teacher)

    def train(self, mode: bool = True) -> "DistillMetaArch":
        super().train(mode)
        self.student_ema.eval()
        self.teacher.eval()
        return self

    def to_device(self, device: torch.device, teacher_dtype: torch.dtype = torch.float32) -> "DistillMetaArch":
        """Move the EMA and buffers (fp32) and the teacher (`teacher_dtype`: bf16 on GPU halves a
        ViT-g teacher to ~2.3 GB) to `device`."""
        self.to(device)
        self.teacher.to(device=device, dtype=teacher_dtype)
        return self

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def get_teacher_output(self, batch: dict, teacher_temp: float,
                           autocast_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Teacher targets (fp32): dino_probs [2B, K] from the CLS tokens and ibot_probs
        [M, K_ibot] from the iBOT target patches (`ibot_targets`) of the unmasked global crops."""
        crops = batch["collated_global_crops"]
        t = ibot_targets(batch, self.patch_size, self.ibot_patches)
        dtype = next(self.teacher.parameters()).dtype
        with _autocast(crops.device, autocast_dtype):
            out = self.teacher.forward_teacher(crops.to(dtype), t["patch_indices"])
        return teacher_targets(self, out["cls_logits"].float(), out["masked_patch_logits"].float(),
                               teacher_temp, t["n_targets"], self.weights.centering)

    def get_student_output(self, student: Callable[..., dict], batch: dict,
                           dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Run the student (DeepSpeed engine or bare `SSLNetwork`) with no masking; its
        `masked_patch_logits` [M, K_ibot] are those of the iBOT target patches."""
        g, l = batch["collated_global_crops"], batch["collated_local_crops"]
        if dtype is not None:
            g, l = g.to(dtype), l.to(dtype)
        unmasked = all_patch_targets(g.shape[0], _n_patches(batch, self.patch_size), g.device)["masks"]
        idx = ibot_targets(batch, self.patch_size, self.ibot_patches)["patch_indices"]
        return student(g, l, unmasked, idx)

    def compute_losses(self, student_out: dict, teacher_out: dict, batch: dict) -> dict[str, Tensor]:
        """Loss terms (fp32 scalars) and `total_loss`, scaled as in pretraining: DINO averaged
        over the crop pairs, iBOT per-image-weighted over the 2B global crops (its target patches),
        KoLeo summed over the two global crops."""
        n_images = batch["collated_global_crops"].shape[0]
        weight = ibot_targets(batch, self.patch_size, self.ibot_patches)["patch_weight"]
        return ssl_losses(student_out, teacher_out, weight, n_images, self.weights)

    # -- EMA ------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self, student: nn.Module, momentum: float, zero3: bool = False,
                       gather_numel: int = 50_000_000) -> None:
        """student_ema = m * student_ema + (1 - m) * student (the name is `train_step`'s: here
        the frozen teacher never moves; the momentum is `distill.student_ema`'s: the pretraining
        momentum schedule, or `distill.student_ema_momentum` throughout).

        Same rules as the pretraining EMA: whole parameters under ZeRO-0/1/2; under ZeRO-3 the
        partitioned student parameters are gathered read-only in chunks of ~`gather_numel`.
        """
        ema_update(self.student_ema, student, momentum, zero3, gather_numel)


# -- networks ---------------------------------------------------------------------------------


def head_from_state_dict(sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """A DINOHead shaped like the weights `sd` (layers, widths, prototypes), loaded strictly."""
    from app.models.heads import DINOHead

    linear = sorted((k for k in sd if k.startswith("mlp") and k.endswith("weight") and sd[k].ndim == 2),
                    key=lambda k: int(k.split(".")[1]) if k.count(".") == 2 else 0)
    if not linear or "last_layer.weight_v" not in sd:
        raise ValueError(f"{what}: not a DINO head state dict (keys: {', '.join(list(sd)[:6])})")
    first, last = sd[linear[0]], sd[linear[-1]]
    head = DINOHead(first.shape[1], sd["last_layer.weight_v"].shape[0], nlayers=len(linear),
                    hidden_dim=first.shape[0], bottleneck_dim=last.shape[0],
                    use_bn=any(k.endswith("running_mean") for k in sd),
                    mlp_bias=any(k.startswith("mlp") and k.endswith("bias") for k in sd))
    head.load_state_dict(dict(sd), strict=True)
    return head


def build_student(cfg: Config, teacher) -> Any:
    """The student: `cfg.student` backbone, heads shaped by `dino` / `ibot` with the teacher's
    prototype counts (the student predicts over the same prototypes)."""
    from app.models.heads import DINOHead
    from app.models.hub import backbone_kwargs
    from app.models.vision_transformer import build_backbone
    from app.ssl.meta_arch import SSLNetwork

    s = cfg.student
    backbone = build_backbone(s.arch, **backbone_kwargs(s))
    dim = backbone.embed_dim
    t_ibot = teacher.ibot_head or teacher.dino_head
    d, i = cfg.dino, cfg.ibot
    dino_head = DINOHead(dim, teacher.dino_head.out_dim, nlayers=d.head_nlayers,
                         hidden_dim=d.head_hidden_dim, bottleneck_dim=d.head_bottleneck_dim)
    ibot_head = None
    if i.separate_head or t_ibot.out_dim != teacher.dino_head.out_dim:
        ibot_head = DINOHead(dim, t_ibot.out_dim, nlayers=i.head_nlayers,
                             hidden_dim=i.head_hidden_dim, bottleneck_dim=i.head_bottleneck_dim)
    return SSLNetwork(backbone, dino_head, ibot_head)


def check_compatible(teacher: SSLNetwork, student: SSLNetwork) -> None:
    """The student's heads must predict over the teacher's prototypes (same K), and both
    backbones must cut images into the same patches (iBOT matches patch i to patch i)."""
    t_ibot = teacher.ibot_head or teacher.dino_head
    s_ibot = student.ibot_head or student.dino_head
    if student.dino_head.out_dim != teacher.dino_head.out_dim:
        raise ValueError(f"student DINO head has {student.dino_head.out_dim} prototypes, the "
                         f"teacher's {teacher.dino_head.out_dim}")
    if s_ibot.out_dim != t_ibot.out_dim:
        raise ValueError(f"student iBOT head has {s_ibot.out_dim} prototypes, the teacher's {t_ibot.out_dim}")
    t_patch, s_patch = teacher.backbone.patch_size, student.backbone.patch_size
    if t_patch != s_patch:
        raise ValueError(f"student patch size {s_patch} differs from the teacher's {t_patch}")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(net: SSLNetwork) -> dict[str, Any]:
    """A few facts for logs and summaries: width, depth, parameter counts."""
    bb = net.backbone
    return {"embed_dim": bb.embed_dim, "depth": bb.depth,
            "backbone_params": sum(p.numel() for p in bb.parameters()),
            "head_params": sum(p.numel() for n, p in net.named_parameters() if not n.startswith("backbone."))}
