"""Backbone outputs, masking, multi-crop, intermediate layers, gradients and stochastic depth."""

import pytest
import torch
import torch.nn.functional as F

from app.models import DINOHead, VisionTransformer, build_backbone


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(embed_dim=32, depth=2, num_heads=2, img_size=224)
    args.update(kw)
    return VisionTransformer(**args)


@pytest.mark.parametrize("height, width", [(224, 224), (98, 98), (224, 168)])
@pytest.mark.parametrize("registers", [0, 4])
def test_forward_features_names_and_shapes(height, width, registers):
    model = tiny(num_register_tokens=registers).eval()
    n = (height // 14) * (width // 14)
    out = model.forward_features(torch.randn(2, 3, height, width))
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 32)
    assert out["x_norm_regtokens"].shape == (2, registers, 32)
    assert out["x_norm_patchtokens"].shape == (2, n, 32)
    assert out["x_prenorm"].shape == (2, 1 + registers + n, 32)
    assert out["masks"] is None
    torch.testing.assert_close(out["x_norm_clstoken"], F.layer_norm(out["x_prenorm"][:, 0], (32,),
                               model.norm.weight, model.norm.bias, eps=1e-6))


def test_forward_returns_the_normalised_cls_token():
    model = tiny().eval()
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(model(x), model.forward_features(x)["x_norm_clstoken"])


def test_non_multiple_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(1, 3, 224, 100\).*patch size 14"):
        tiny()(torch.randn(1, 3, 224, 100))


def patch_embed_by_hand(model, x):
    """Patch projection without the conv: unfold 14x14 patches row-major and multiply."""
    p = model.patch_size
    patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # [B, N, 3*p*p]
    w = model.patch_embed.proj.weight.flatten(1)
    return patches @ w.T + model.patch_embed.proj.bias


def test_masked_patches_are_replaced_by_the_mask_token_before_pos_embed():
    model = tiny(img_size=56, num_register_tokens=2)
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    masks[1, 3] = True
    with torch.no_grad():
        tokens = model.prepare_tokens(x, masks)
        patches = tokens[:, 1 + 2 :]
        pos = model.pos_embed[:, 1:]
        expected = torch.where(masks.unsqueeze(-1), model.mask_token + pos, patch_embed_by_hand(model, x) + pos)
    torch.testing.assert_close(patches, expected, rtol=1e-5, atol=1e-5)
    # registers sit after CLS and carry no positional embedding
    torch.testing.assert_close(tokens[:, 1:3], model.register_tokens.detach().expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1]).detach()[0].expand(2, -1))
    out = model.forward_features(x, masks)
    assert out["masks"] is masks


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="masks"):
        tiny(img_size=56).forward_features(torch.randn(2, 3, 56, 56), torch.zeros(2, 15, dtype=torch.bool))


def test_forward_features_list_matches_separate_calls():
    model = tiny().eval()
    g, loc = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    masks = torch.rand(4, 16) > 0.5
    outs = model.forward_features_list([g, loc], [masks, None])
    assert len(outs) == 2
    assert outs[0]["x_norm_patchtokens"].shape == (4, 16, 32)
    assert outs[1]["x_norm_patchtokens"].shape == (6, 4, 32)
    torch.testing.assert_close(outs[0]["x_norm_clstoken"], model.forward_features(g, masks)["x_norm_clstoken"])
    torch.testing.assert_close(outs[1]["x_prenorm"], model.forward_features(loc)["x_prenorm"])


def test_get_intermediate_layers_shapes_order_and_reshape():
    model = tiny(depth=4, num_register_tokens=4).eval()
    x = torch.randn(2, 3, 56, 42)  # 4 x 3 patch grid
    last2 = model.get_intermediate_layers(x, n=2)
    assert len(last2) == 2 and all(o.shape == (2, 12, 32) for o in last2)
    final = model.forward_features(x)["x_norm_patchtokens"]
    torch.testing.assert_close(last2[-1], final)
    listed = model.get_intermediate_layers(x, n=[0, 3])
    torch.testing.assert_close(listed[1], final)
    maps = model.get_intermediate_layers(x, n=1, reshape=True)[0]
    assert maps.shape == (2, 32, 4, 3)
    torch.testing.assert_close(maps[:, :, 1, 2], final[:, 1 * 3 + 2])  # row 1, column 2
    (patches, cls), = model.get_intermediate_layers(x, n=1, return_class_token=True)
    torch.testing.assert_close(cls, model.forward_features(x)["x_norm_clstoken"])
    raw = model.get_intermediate_layers(x, n=1, norm=False)[0]
    torch.testing.assert_close(raw, model.forward_features(x)["x_prenorm"][:, 5:])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[7])


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_gradients_reach_every_backbone_and_head_parameter(ffn):
    model = tiny(img_size=56, ffn=ffn, num_register_tokens=2, init_values=1e-5).train()
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    x = torch.randn(2, 3, 56, 56)
    out = model.forward_features(x)
    (head(out["x_norm_clstoken"]).logsumexp(-1).sum() + out["x_norm_regtokens"].sum()).backward()
    no_grad = [n for n, p in list(model.named_parameters()) + list(head.named_parameters())
               if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == ["mask_token"]
    model.zero_grad()
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :3] = True
    model.forward_features(x, masks)["x_norm_patchtokens"].sum().backward()
    assert torch.any(model.mask_token.grad != 0)


@pytest.mark.parametrize("rate", [0.08, 0.5])  # per-sample Bernoulli / batch-subset paths
def test_drop_path_is_only_active_in_train_mode(rate):
    model = tiny(img_size=56, drop_path_rate=rate, init_values=1.0)
    x = torch.randn(16, 3, 56, 56)
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(1)
    c = model(x)
    torch.manual_seed(2)
    d = model(x)
    assert not torch.allclose(c, d)
    assert not torch.allclose(c, a)
    no_drop = tiny(img_size=56, drop_path_rate=0.0, init_values=1.0).train()
    torch.testing.assert_close(no_drop(x), no_drop.eval()(x))


def test_drop_path_rates_uniform_or_linear():
    uniform = build_backbone("vit_tiny", depth=4, img_size=28, drop_path_rate=0.3)
    assert [b.drop_path_rate for b in uniform.blocks] == pytest.approx([0.3] * 4)
    linear = build_backbone("vit_tiny", depth=4, img_size=28, drop_path_rate=0.3, drop_path_uniform=False)
    assert [b.drop_path_rate for b in linear.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for ckpt in (False, True):
        model = tiny(img_size=28).train()
        model.set_grad_checkpointing(ckpt)
        model(x).sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_attention_matches_a_by_hand_softmax():
    model = tiny(img_size=28).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q, k, v = attn.qkv(x).chunk(3, dim=-1)  # rows ordered q, k, v
        split = lambda t: t.reshape(2, 5, 2, 16).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-1, -2) / 16 ** 0.5).softmax(-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
