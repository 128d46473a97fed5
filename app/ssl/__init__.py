"""Self-supervised objectives of DINOv2 as small pure pieces: losses, teacher centering, iBOT
masking, schedules and optimizer parameter groups. The meta-architecture composes them."""

from app.ssl.centering import (
    all_reduce_max,
    all_reduce_sum,
    distributed_world_size,
    sinkhorn_knopp,
    softmax_center_teacher,
    update_center,
)
from app.ssl.dino_loss import dino_cross_entropy, dino_loss, dino_multicrop_loss, dino_pair_count
from app.ssl.ibot_loss import ibot_patch_loss, ibot_patch_loss_masked
from app.ssl.koleo_loss import koleo_loss, koleo_loss_per_crop
from app.ssl.masking import BlockMaskGenerator, collate_data_and_masks, numpy_rng_from_torch, sample_masks
from app.ssl.param_groups import apply_schedules, get_params_groups
from app.ssl.schedules import Schedules, ScheduleValues, cosine_schedule, teacher_temperature_schedule

__all__ = [
    "BlockMaskGenerator",
    "ScheduleValues",
    "Schedules",
    "all_reduce_max",
    "all_reduce_sum",
    "apply_schedules",
    "collate_data_and_masks",
    "cosine_schedule",
    "dino_cross_entropy",
    "dino_loss",
    "dino_multicrop_loss",
    "dino_pair_count",
    "distributed_world_size",
    "get_params_groups",
    "ibot_patch_loss",
    "ibot_patch_loss_masked",
    "koleo_loss",
    "koleo_loss_per_crop",
    "numpy_rng_from_torch",
    "sample_masks",
    "sinkhorn_knopp",
    "softmax_center_teacher",
    "teacher_temperature_schedule",
    "update_center",
]
