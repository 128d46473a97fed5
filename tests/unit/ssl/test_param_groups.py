"""Parameter groups: layer-wise lr decay, patch-embed multiplier, no-wd set, last-layer flag."""

import pytest
import torch
from torch import nn

from app.ssl.param_groups import apply_schedules, get_params_groups

# Heads use the old weight_norm API on purpose: its keys (weight_g, weight_v) are the official ones.
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


class TinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(d))


class TinyViT(nn.Module):
    def __init__(self, d=4, depth=2):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, d))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)


class TinyHead(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.last_layer = nn.utils.weight_norm(nn.Linear(d, 6, bias=False))


def student():
    return nn.ModuleDict({"backbone": TinyViT(), "dino_head": TinyHead(), "ibot_head": TinyHead()})


def lookup(groups):
    out = {}
    for g in groups:
        for name in g["param_names"]:
            out[name] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
    return out


def test_multipliers_for_official_names():
    groups = get_params_groups(student(), layerwise_decay=0.5, patch_embed_lr_mult=0.2, with_names=True)
    m = lookup(groups)
    L = 2  # blocks; layer ids: tokens/patch_embed 0, block i -> i + 1, rest 3; mult 0.5 ** (3 - id)
    # The learned tokens are decayed, as in the reference (its no-wd set: biases, norms, gammas)
    assert m["backbone.cls_token"] == (0.125, 1.0, False)
    assert m["backbone.pos_embed"] == (0.125, 1.0, False)
    assert m["backbone.mask_token"] == (0.125, 1.0, False)
    assert m["backbone.register_tokens"] == (0.125, 1.0, False)
    assert m["backbone.patch_embed.proj.weight"] == (pytest.approx(0.125 * 0.2), 1.0, False)
    assert m["backbone.patch_embed.proj.bias"] == (pytest.approx(0.125 * 0.2), 0.0, False)
    assert m["backbone.blocks.0.attn.qkv.weight"] == (0.25, 1.0, False)
    assert m["backbone.blocks.0.attn.qkv.bias"] == (0.25, 0.0, False)
    assert m["backbone.blocks.0.norm1.weight"] == (0.25, 0.0, False)
    assert m["backbone.blocks.1.ls1.gamma"] == (0.5, 0.0, False)
    assert m["backbone.blocks.1.attn.qkv.weight"] == (0.5 ** (L + 1 - 2), 1.0, False)
    assert m["backbone.norm.weight"] == (1.0, 0.0, False)
    assert m["dino_head.mlp.0.weight"] == (1.0, 1.0, False)
    assert m["ibot_head.mlp.2.bias"] == (1.0, 0.0, False)
    assert m["dino_head.last_layer.weight_g"] == (1.0, 1.0, True)
    assert m["dino_head.last_layer.weight_v"] == (1.0, 1.0, True)
    # every trainable parameter is in exactly one group, groups are fused by key
    n_params = sum(1 for _ in student().parameters())
    assert sum(len(g["params"]) for g in groups) == n_params
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))


def test_learned_tokens_can_be_exempted_from_weight_decay():
    groups = get_params_groups(student(), with_names=True, decay_tokens=False)
    m = lookup(groups)
    for name in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert m[f"backbone.{name}"][1] == 0.0
    assert m["backbone.patch_embed.proj.weight"][1] == 1.0


def test_the_recipe_config_decays_the_tokens_and_the_trainer_passes_it():
    from app.config import load_config

    assert load_config("demo").optim.decay_learned_tokens is True
    assert load_config("demo", ["optim.decay_learned_tokens=false"]).optim.decay_learned_tokens is False


def test_bare_backbone_names_and_frozen_params():
    vit = TinyViT(depth=3)
    vit.norm.weight.requires_grad_(False)
    m = lookup(get_params_groups(vit, layerwise_decay=0.9, with_names=True))
    assert "norm.weight" not in m
    assert m["blocks.2.attn.qkv.weight"][0] == pytest.approx(0.9)
    assert m["cls_token"][0] == pytest.approx(0.9**4)


def test_apply_schedules_sets_lr_and_wd_per_group():
    model = student()
    groups = get_params_groups(model, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    opt = torch.optim.AdamW(groups, lr=0.0)
    apply_schedules(opt.param_groups, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        if g["is_last_layer"]:
            assert g["lr"] == 0.0
        else:
            assert g["lr"] == pytest.approx(1e-3 * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    # a step with last_layer_lr 0 leaves the prototypes untouched
    before = model["dino_head"].last_layer.weight_v.detach().clone()
    x = torch.randn(2, 4)
    model["dino_head"].last_layer(model["dino_head"].mlp(x)).sum().backward()
    opt.step()
    assert torch.equal(before, model["dino_head"].last_layer.weight_v)


def test_groups_for_the_real_backbone_and_heads():
    vt = pytest.importorskip("app.models.vision_transformer")
    heads = pytest.importorskip("app.models.heads")
    backbone = vt.vit_tiny(patch_size=14, img_size=28, num_register_tokens=2)
    dim = backbone.embed_dim
    model = nn.ModuleDict(
        {"backbone": backbone, "dino_head": heads.DINOHead(in_dim=dim, out_dim=16, hidden_dim=16, bottleneck_dim=8)}
    )
    groups = get_params_groups(model, layerwise_decay=0.9, patch_embed_lr_mult=0.2, with_names=True)
    m = lookup(groups)
    depth = len(backbone.blocks)
    assert set(m) == {n for n, _ in model.named_parameters()}
    for token in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert m[f"backbone.{token}"] == (pytest.approx(0.9 ** (depth + 1)), 1.0, False)
    assert m[f"backbone.blocks.{depth - 1}.attn.qkv.weight"][:2] == (pytest.approx(0.9), 1.0)
    assert m["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.2 * 0.9 ** (depth + 1))
    assert m["dino_head.last_layer.weight_v"] == (1.0, 1.0, True)
