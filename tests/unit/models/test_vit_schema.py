"""The backbone state dict follows the official DINOv2 key schema (reference table, §1b)."""

import pytest
import torch

from app.models import (
    build_backbone, dinov2_vitb14, dinov2_vitg14, dinov2_vitg14_reg, dinov2_vitl14,
    dinov2_vits14, dinov2_vits14_reg,
)


def expected_official_schema(dim: int, depth: int, swiglu: bool, registers: int) -> dict:
    """Official keys and shapes, written out by hand from the recipe's checkpoint table."""
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1370, dim),  # 1 + 37*37 for 518/14
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        keys["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "ls2.gamma": (dim,),
        })
        if swiglu:
            keys.update({
                b + "mlp.w12.weight": (8192, 1536), b + "mlp.w12.bias": (8192,),
                b + "mlp.w3.weight": (1536, 4096), b + "mlp.w3.bias": (1536,),
            })
        else:
            keys.update({
                b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
            })
    return keys


@pytest.mark.parametrize(
    "factory, dim, depth, swiglu, registers",
    [
        (dinov2_vits14, 384, 12, False, 0),
        (dinov2_vitb14, 768, 12, False, 0),
        (dinov2_vitl14, 1024, 24, False, 0),
        (dinov2_vitg14, 1536, 40, True, 0),
        (dinov2_vits14_reg, 384, 12, False, 4),
        (dinov2_vitg14_reg, 1536, 40, True, 4),
    ],
)
def test_hub_model_keys_and_shapes_match_the_official_table(factory, dim, depth, swiglu, registers):
    with torch.device("meta"):
        model = factory()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected_official_schema(dim, depth, swiglu, registers)


def test_official_parameter_counts():
    # README sizes: 21 M (S), 86 M (B), 300 M (L), 1,100 M (g); derived exact counts in the notes.
    expected_millions = {dinov2_vits14: 22.1, dinov2_vitb14: 86.6, dinov2_vitl14: 304.4, dinov2_vitg14: 1136.5}
    for factory, millions in expected_millions.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in factory().parameters())
        assert abs(n / 1e6 - millions) < 0.1, factory.__name__


def test_layerscale_can_be_disabled():
    model = build_backbone("vit_tiny", depth=1, img_size=28, init_values=None)
    assert not any("ls1" in k or "ls2" in k for k in model.state_dict())
    assert "blocks.0.ls1.gamma" in build_backbone("vit_tiny", depth=1, img_size=28, init_values=1e-5).state_dict()


def test_init_follows_the_official_recipe():
    torch.manual_seed(0)
    model = build_backbone("vit_small", depth=2, img_size=224, num_register_tokens=4, init_values=1e-5)
    assert torch.count_nonzero(model.mask_token) == 0
    assert model.cls_token.abs().max() < 1e-4  # normal(std=1e-6)
    assert model.register_tokens.abs().max() < 1e-4
    assert 0.015 < model.pos_embed.std() < 0.025
    assert 0.015 < model.blocks[0].attn.qkv.weight.std() < 0.025
    assert torch.count_nonzero(model.blocks[0].mlp.fc1.bias) == 0
    assert torch.all(model.blocks[1].ls2.gamma == 1e-5)
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="vit_huge"):
        build_backbone("vit_huge")
