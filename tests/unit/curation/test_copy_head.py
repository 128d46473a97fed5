"""The copy-detection head: layout features, copy edits, and what the contrastive fit learns."""

import numpy as np
import pytest
import torch
from PIL import Image

from app.curation.copy_head import CopyHead, copy_edit, koleo, layout_features, train_copy_head


def test_layout_features_are_cls_plus_grid_cells_each_normalised():
    out = {"x_norm_clstoken": torch.randn(3, 8) * 5, "x_norm_patchtokens": torch.randn(3, 16, 8)}
    f = layout_features(out, grid=2)
    assert f.shape == (3, 8 + 4 * 8)
    assert torch.allclose(f[:, :8].norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(f[:, 8:].norm(dim=1), torch.ones(3), atol=1e-5)
    # cell (0, 0) of a 4x4 token grid pooled to 2x2 is the mean of tokens 0, 1, 4, 5
    cell = out["x_norm_patchtokens"][0, [0, 1, 4, 5]].mean(0)
    assert torch.allclose(f[0, 8:16] * 2, cell / cell.norm(), atol=1e-5)
    with pytest.raises(ValueError, match="square patch grid"):
        layout_features({"x_norm_clstoken": torch.randn(1, 8), "x_norm_patchtokens": torch.randn(1, 6, 8)}, 2)


def test_copy_edit_is_a_mild_seeded_edit():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    a = copy_edit(img, np.random.default_rng(1))
    b = copy_edit(img, np.random.default_rng(1))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.mode == "RGB" and 0.6 * 80 <= a.width <= 1.2 * 80 and 0.6 * 60 <= a.height <= 1.2 * 60


def test_koleo_is_lower_for_spread_rows():
    spread = torch.eye(4)
    bunched = torch.nn.functional.normalize(torch.ones(4, 4) + 0.01 * torch.eye(4), dim=1)
    assert koleo(spread) < koleo(bunched)


def test_head_learns_copies_close_and_distinct_images_apart():
    """Views of one 'image' differ by noise that looks like content in the raw features; the
    fitted head must put views of one image above cosine 0.6 and different images below it."""
    g = torch.Generator().manual_seed(0)
    n, v, d = 200, 6, 64
    identity = torch.randn(n, 1, 24, generator=g)  # what makes an image itself
    mixing = torch.randn(24, d, generator=g) / 24 ** 0.5
    nuisance = torch.randn(n, v, d, generator=g) * 1.5  # edits: large, but not image-specific
    views = identity @ mixing + nuisance
    head = train_copy_head(views, dim=24, temperature=0.1, koleo_weight=1.0, steps=300,
                           batch_size=128, seed=0, grid=1)
    z0 = head(views[:, 0].numpy())
    z1 = head(views[:, 1].numpy())
    same = (z0 * z1).sum(1)
    cross = z0 @ z1.T
    np.fill_diagonal(cross, -1)
    assert np.median(same) > 0.6
    assert np.percentile(cross.max(1), 50) < 0.6
    assert head.stats["infonce_last"] < head.stats["infonce_first"]
    # the raw features alone do not separate them at 0.6
    raw0 = torch.nn.functional.normalize(views[:, 0], dim=1)
    raw1 = torch.nn.functional.normalize(views[:, 1], dim=1)
    assert np.median((raw0 * raw1).sum(1).numpy()) < 0.6
    again = CopyHead.from_arrays(head.arrays())
    assert np.allclose(again(views[:5, 0].numpy()), z0[:5], atol=1e-6)


def test_head_needs_two_views_of_two_images():
    with pytest.raises(ValueError, match="needs >= 2 images"):
        train_copy_head(torch.zeros(1, 3, 4))
