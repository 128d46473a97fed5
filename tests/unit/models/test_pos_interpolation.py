"""Positional-embedding interpolation reproduces the official DINOv2 rule and token order."""

import math

import pytest
import torch
import torch.nn.functional as F

from app.models import VisionTransformer, interpolate_pos_embed

VARIANTS = [
    pytest.param(dict(interpolate_offset=0.1, interpolate_antialias=False), id="offset0.1"),
    pytest.param(dict(interpolate_offset=0.0, interpolate_antialias=True), id="registers-style"),
]
SIZES = [(224, 224), (98, 98), (224, 168), (168, 224), (588, 420)]


def tiny_model(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(embed_dim=8, depth=1, num_heads=1, img_size=518, **kw)


def reference_pos_embed(pos_embed, height, width, patch, offset, antialias):
    """Straight from the formula: the stored M x M grid is [rows = image height, cols = width]."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    gh, gw = height // patch, width // patch
    if gh == gw == m:
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].float().reshape(m, m, d).permute(2, 0, 1).unsqueeze(0)
    if offset:
        out = F.interpolate(grid, scale_factor=((gh + offset) / m, (gw + offset) / m), mode="bicubic",
                            antialias=antialias)
    else:
        out = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=antialias)
    rows = [out[0, :, r, c] for r in range(gh) for c in range(gw)]  # row-major: height, then width
    return torch.cat([pos_embed[0, :1].float(), torch.stack(rows)]).unsqueeze(0)


def tokens_with_zero_patch_embed(model, height, width):
    """prepare_tokens with a zeroed patch projection: every token is its positional embedding."""
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        return model.prepare_tokens(torch.randn(1, 3, height, width))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("height, width", SIZES)
def test_model_tokens_match_the_reference_formula(variant, height, width):
    model = tiny_model(**variant)
    tokens = tokens_with_zero_patch_embed(model, height, width)
    expected = reference_pos_embed(model.pos_embed.detach(), height, width, 14,
                                   variant["interpolate_offset"], variant["interpolate_antialias"])
    assert tokens.shape == (1, 1 + (height // 14) * (width // 14), 8)
    torch.testing.assert_close(tokens[:, 1:], expected[:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token[:, 0] + expected[:, 0]).detach())


def test_matching_grid_is_a_no_op():
    model = tiny_model()
    assert model.interpolate_pos_encoding(518, 518) is model.pos_embed
    tokens = tokens_with_zero_patch_embed(model, 518, 518)
    torch.testing.assert_close(tokens, model.pos_embed.detach())


def coordinate_pos_embed(m: int) -> torch.Tensor:
    """Channel 0 = row index, channel 1 = column index of each stored grid position."""
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    pos = torch.zeros(1, 1 + m * m, 2)
    pos[0, 1:, 0] = rows.flatten().float()
    pos[0, 1:, 1] = cols.flatten().float()
    return pos


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True), (0.0, False)])
def test_non_square_grid_is_row_major_over_height_then_width(offset, antialias):
    m, gh, gw = 37, 16, 12  # 518 grid resized for a 224 (H) x 168 (W) image
    out = interpolate_pos_embed(coordinate_pos_embed(m), (gh, gw), offset, antialias)[0, 1:]
    row_coord = out[:, 0].reshape(gh, gw)
    col_coord = out[:, 1].reshape(gh, gw)
    # the row coordinate depends on the token's row only and grows down the image
    assert torch.allclose(row_coord, row_coord[:, :1].expand(gh, gw), atol=1e-5)
    assert torch.all(row_coord[1:, 0] > row_coord[:-1, 0])
    assert torch.allclose(col_coord, col_coord[:1, :].expand(gh, gw), atol=1e-5)
    assert torch.all(col_coord[0, 1:] > col_coord[0, :-1])
    if not antialias:
        # The sampling scale is (g + offset) / M: the offset kludge, or plain g / M without it.
        for coord, g in ((row_coord[:, 0], gh), (col_coord[0], gw)):
            expected = keys_cubic_resample([float(v) for v in range(m)], g, (g + offset) / m)
            torch.testing.assert_close(coord, expected, rtol=0, atol=1e-4)


def test_interpolation_runs_in_fp32_and_returns_the_input_dtype():
    pos = coordinate_pos_embed(37).to(torch.bfloat16)
    out = interpolate_pos_embed(pos, (16, 16), 0.1, False)
    assert out.dtype == torch.bfloat16
    ref = interpolate_pos_embed(pos.float(), (16, 16), 0.1, False).to(torch.bfloat16)
    assert torch.equal(out, ref)


def keys_cubic_resample(values, out_len, scale):
    """1-D bicubic by hand: Keys kernel (a = -0.75, as PyTorch), pixel-centre coordinates
    `src = (i + 0.5) / scale - 0.5`, border samples clamped."""
    a = -0.75

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    n = len(values)
    out = []
    for i in range(out_len):
        src = (i + 0.5) / scale - 0.5
        x0 = math.floor(src)
        out.append(sum(kernel(src - j) * values[min(max(j, 0), n - 1)] for j in range(x0 - 1, x0 + 3)))
    return torch.tensor(out)


def test_cls_position_is_kept():
    pos = torch.randn(1, 1 + 37 * 37, 4)
    out = interpolate_pos_embed(pos, (7, 7), 0.1, False)
    assert torch.equal(out[:, 0], pos[:, 0])
