"""Named entry points like the official `torch.hub` ones, loading LOCAL weights only.

    model = dinov2_vits14(weights="/models/dinov2_vits14_pretrain.pth")   # strict=True
    model = dinov2_vitb14_reg()                                            # random init

Models are built like the official hub ones: `img_size=518`, `patch_size=14`, `init_values=1.0`;
`_reg` models add 4 register tokens and interpolate with antialias and offset 0.
"""

from __future__ import annotations

from app.models.convert import from_official, load_state_dict_file
from app.models.vision_transformer import VisionTransformer, build_backbone


def _hub_model(arch: str, registers: bool, weights: str | None, kw: dict) -> VisionTransformer:
    if "pretrained" in kw:
        raise ValueError("'pretrained' is not supported (nothing is downloaded): "
                         "pass weights=<local path or URI of the official .pth>")
    defaults = dict(img_size=518, patch_size=14, init_values=1.0)
    if registers:
        defaults.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    model = build_backbone(arch, **{**defaults, **kw})
    if weights:
        sd = load_state_dict_file(weights)
        model.load_state_dict(from_official(sd, model), strict=True)
    return model


def dinov2_vits14(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_small", False, weights, kw)


def dinov2_vitb14(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_base", False, weights, kw)


def dinov2_vitl14(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_large", False, weights, kw)


def dinov2_vitg14(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_giant2", False, weights, kw)


def dinov2_vits14_reg(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_small", True, weights, kw)


def dinov2_vitb14_reg(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_base", True, weights, kw)


def dinov2_vitl14_reg(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_large", True, weights, kw)


def dinov2_vitg14_reg(weights: str | None = None, **kw) -> VisionTransformer:
    return _hub_model("vit_giant2", True, weights, kw)


def backbone_kwargs(m) -> dict:
    """`build_backbone` keywords from an `app.config.ModelConfig` (field names as in the official
    YAML), with its optional width/depth overrides (0 = the architecture's own)."""
    kw: dict = dict(
        patch_size=m.patch_size, img_size=m.img_size,
        ffn="swiglu" if m.ffn_layer.startswith("swiglu") else m.ffn_layer,
        drop_path_rate=m.drop_path_rate, drop_path_uniform=m.drop_path_uniform,
        init_values=m.layerscale, qkv_bias=m.qkv_bias, proj_bias=m.proj_bias, ffn_bias=m.ffn_bias,
        num_register_tokens=m.num_register_tokens, interpolate_offset=m.interpolate_offset,
        interpolate_antialias=m.interpolate_antialias,
    )
    if m.embed_dim:
        kw.update(embed_dim=m.embed_dim, num_heads=m.embed_dim // 64)
    if m.depth:
        kw["depth"] = m.depth
    return kw


def backbone_from_config(cfg) -> VisionTransformer:
    """Backbone from an `app.config.ModelConfig` (field names as in the official YAML).

    `pretrained_weights`, when set, is loaded strictly (official schema or a training checkpoint).
    """
    model = build_backbone(cfg.arch, **backbone_kwargs(cfg))
    if getattr(cfg, "pretrained_weights", ""):
        from app.models.convert import backbone_from_training_checkpoint, validate_official

        raw = load_state_dict_file(cfg.pretrained_weights)
        try:
            validate_official(raw)
            sd = raw
        except ValueError:
            sd = backbone_from_training_checkpoint(raw)
        model.load_state_dict(from_official(sd, model), strict=True)
    return model
