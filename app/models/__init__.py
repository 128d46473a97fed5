"""Model code: the DINOv2 ViT backbone, the DINO/iBOT head, hub entry points, conversion.

Backbone state dicts use the official DINOv2 key schema (see `convert.py`).
"""

from app.models.convert import (
    CheckpointError,
    backbone_from_training_checkpoint,
    export_backbone,
    from_official,
    heads_from_training_checkpoint,
    load_backbone,
    to_official,
    validate_official,
)
from app.models.heads import DINOHead
from app.models.hub import (
    backbone_from_config,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)
from app.models.vision_transformer import (
    ARCHS,
    VisionTransformer,
    build_backbone,
    interpolate_pos_embed,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS", "CheckpointError", "DINOHead", "VisionTransformer", "backbone_from_config",
    "backbone_from_training_checkpoint", "build_backbone", "dinov2_vitb14", "dinov2_vitb14_reg",
    "dinov2_vitg14", "dinov2_vitg14_reg", "dinov2_vitl14", "dinov2_vitl14_reg", "dinov2_vits14",
    "dinov2_vits14_reg", "export_backbone", "from_official", "heads_from_training_checkpoint",
    "interpolate_pos_embed", "load_backbone", "to_official", "validate_official", "vit_base",
    "vit_giant2", "vit_large", "vit_small", "vit_tiny",
]
