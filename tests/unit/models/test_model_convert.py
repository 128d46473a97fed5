"""Official-schema round trips, training-checkpoint extraction, export / load with inference."""

import pytest
import torch

from app.models import (
    CheckpointError, DINOHead, VisionTransformer, backbone_from_training_checkpoint, build_backbone,
    dinov2_vits14_reg, export_backbone, from_official, heads_from_training_checkpoint, load_backbone,
    to_official, validate_official,
)


def small(**kw):
    torch.manual_seed(0)
    return build_backbone("vit_small", depth=2, img_size=56, **kw).eval()


@pytest.mark.parametrize("build", [
    lambda: small(),
    lambda: small(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0),
    lambda: build_backbone("vit_giant2", depth=1, img_size=28).eval(),
])
def test_state_dict_round_trips_through_the_official_schema_strictly(build):
    src = build()
    official = to_official(src)
    dst = build()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    dst.load_state_dict(from_official(official, dst), strict=True)
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(dst.forward_features(x)["x_prenorm"], src.forward_features(x)["x_prenorm"])


def test_validation_lists_missing_unexpected_and_mis_shaped_keys():
    model = small()
    sd = dict(model.state_dict())
    del sd["norm.bias"]
    sd["blocks.2.ls1.gamma"] = torch.zeros(384)
    with pytest.raises(CheckpointError) as err:
        validate_official(sd, model)
    msg = str(err.value)
    assert "missing keys: norm.bias" in msg
    assert "unexpected keys: blocks.2.ls1.gamma" in msg
    assert "shape mismatches: pos_embed (1, 17, 384) != (1, 17, 384)" not in msg
    with pytest.raises(CheckpointError, match="outside the official.*head.weight"):
        validate_official({**model.state_dict(), "head.weight": torch.zeros(1)})


def test_shape_mismatch_is_named():
    model = small()
    sd = dict(model.state_dict())
    sd["pos_embed"] = torch.zeros(1, 5, 384)
    with pytest.raises(CheckpointError, match=r"pos_embed \(1, 5, 384\) != \(1, 17, 384\)"):
        from_official(sd, model)


def chunked_training_checkpoint(student, teacher, dino, ibot):
    """Layout of an official FSDP run with block_chunks=2 under DDP-style `module.` names."""
    def chunk(sd):
        out = {}
        for k, v in sd.items():
            if k.startswith("blocks."):
                i = int(k.split(".")[1])
                k = f"blocks.{i // 1}.{i}." + k.split(".", 2)[2]  # depth 2, chunks of 1
            out[k] = v
        return out
    model = {}
    for name, net in (("student", student), ("teacher", teacher)):
        model.update({f"module.{name}.backbone.{k}": v for k, v in chunk(net.state_dict()).items()})
        model.update({f"module.{name}.dino_head.{k}": v for k, v in dino.state_dict().items()})
        model.update({f"module.{name}.ibot_head.{k}": v for k, v in ibot.state_dict().items()})
    return {"model": model, "iteration": torch.tensor(10)}


def test_backbone_and_heads_come_out_of_a_chunked_training_checkpoint():
    student, teacher = small(), build_backbone("vit_small", depth=2, img_size=56)
    dino, ibot = DINOHead(384, 10, hidden_dim=8, bottleneck_dim=4), DINOHead(384, 12, hidden_dim=8, bottleneck_dim=4)
    ckpt = chunked_training_checkpoint(student, teacher, dino, ibot)
    assert any(k.startswith("module.teacher.backbone.blocks.1.1.") for k in ckpt["model"])
    sd = backbone_from_training_checkpoint(ckpt)
    assert sd.keys() == teacher.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in teacher.state_dict().items())
    sd_student = backbone_from_training_checkpoint(ckpt, prefix="student.backbone.")
    assert torch.equal(sd_student["blocks.1.attn.qkv.weight"], student.blocks[1].attn.qkv.weight)
    heads = heads_from_training_checkpoint(ckpt)
    assert set(heads) == {"dino_head", "ibot_head"}
    assert heads["ibot_head"]["last_layer.weight_v"].shape == (12, 4)
    DINOHead(384, 10, hidden_dim=8, bottleneck_dim=4).load_state_dict(heads["dino_head"], strict=True)


def test_official_teacher_checkpoint_layout_is_understood():
    teacher = small()
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}}
    sd = backbone_from_training_checkpoint(ckpt)
    assert sd.keys() == teacher.state_dict().keys()


def test_training_checkpoint_without_backbone_is_a_clear_error():
    with pytest.raises(CheckpointError, match="no backbone.*optimizer"):
        backbone_from_training_checkpoint({"optimizer": {"lr": torch.tensor(1.0)}})


@pytest.mark.parametrize("build, arch", [
    (lambda: small(), None),
    (lambda: small(), "vit_small"),  # with `depth=2`: depth is not part of the named arch
    (lambda: small(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0), None),
    (lambda: VisionTransformer(embed_dim=128, depth=2, num_heads=2, img_size=42, ffn="swiglu",
                               init_values=None, qkv_bias=False), None),
])
def test_export_then_load_backbone_infers_the_architecture(tmp_path, build, arch):
    src = build().eval()
    uri = (tmp_path / "export" / "backbone.pth").as_uri()
    export_backbone(src, uri)
    loaded = load_backbone(uri, arch=arch, **({"depth": 2} if arch else {}))
    assert loaded.state_dict().keys() == src.state_dict().keys()
    x = torch.randn(2, 3, 28, 42)
    torch.testing.assert_close(loaded(x), src(x))
    if src.num_register_tokens:
        assert loaded.interpolate_offset == 0.0 and loaded.interpolate_antialias


def test_load_backbone_with_a_named_arch_reports_a_depth_mismatch(tmp_path):
    uri = (tmp_path / "backbone.pth").as_uri()
    export_backbone(small(), uri)
    with pytest.raises(CheckpointError, match="backbone.pth: missing keys: blocks.2"):
        load_backbone(uri, arch="vit_small", depth=3)


def test_load_backbone_accepts_a_training_checkpoint_path(tmp_path):
    teacher = small()
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}}, path)
    loaded = load_backbone(str(path))
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded(x), teacher(x))


def test_hub_loader_is_strict_and_never_downloads(tmp_path):
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.manual_seed(0)
    src = dinov2_vits14_reg(depth=1)
    torch.save(src.state_dict(), path)
    loaded = dinov2_vits14_reg(weights=str(path), depth=1)
    assert torch.equal(loaded.pos_embed, src.pos_embed)
    with pytest.raises(CheckpointError, match="missing keys: blocks.1"):
        dinov2_vits14_reg(weights=str(path), depth=2)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        dinov2_vits14_reg(pretrained=True)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_backbone(str(path))


def test_backbone_from_config_maps_the_official_field_names_and_loads_weights(tmp_path):
    from app.config import ModelConfig
    from app.models import backbone_from_config

    cfg = ModelConfig(arch="vit_tiny", img_size=56, ffn_layer="swiglufused", drop_path_rate=0.4,
                      drop_path_uniform=False, layerscale=1e-5, num_register_tokens=2)
    model = backbone_from_config(cfg)
    assert "blocks.0.mlp.w12.weight" in model.state_dict()
    assert model.blocks[-1].drop_path_rate == pytest.approx(0.4) and model.blocks[0].drop_path_rate == 0.0
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    cfg.pretrained_weights = str(path)
    loaded = backbone_from_config(cfg)
    assert torch.equal(loaded.pos_embed, model.pos_embed)
