"""BEiT-style block masks and the iBOT collate: counts, stratified ratios, determinism."""

import numpy as np
import pytest
import torch

from app.ssl.masking import BlockMaskGenerator, collate_data_and_masks, sample_masks


def fake_samples(B, n_local=2, g=28, l=14):
    out = []
    for b in range(B):
        out.append(
            {
                "global_crops": [torch.full((3, g, g), float(10 * b + c)) for c in range(2)],
                "local_crops": [torch.full((3, l, l), float(100 + 10 * b + c)) for c in range(n_local)],
            }
        )
    return out


def test_generator_masks_at_most_the_requested_count_in_blocks():
    gen = BlockMaskGenerator((16, 16))
    rng = np.random.default_rng(0)
    for target in (0, 4, 26, 77, 128):
        mask = gen(target, rng)
        assert mask.shape == (16, 16) and mask.dtype == bool
        assert mask.sum() <= target
        if target >= 26:
            assert mask.sum() >= 0.75 * target  # blocks keep being added until ~ the target
    assert gen(0, rng).sum() == 0


def test_each_block_is_one_rectangle_no_larger_than_max_num_patches():
    gen = BlockMaskGenerator((16, 16), min_num_patches=4, max_num_patches=20)
    rng = np.random.default_rng(3)
    for _ in range(50):
        mask = np.zeros((16, 16), dtype=bool)
        added = gen._add_block(mask, 20, rng)
        ys, xs = np.nonzero(mask)
        assert added == mask.sum() > 0
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert box == mask.sum() <= 20  # a filled rectangle
        assert ys.max() - ys.min() + 1 < 16 and xs.max() - xs.min() + 1 < 16


def test_generator_requires_an_explicit_rng():
    with pytest.raises(ValueError, match="rng"):
        BlockMaskGenerator((4, 4))(3)


def test_stratified_ratios_and_mask_count():
    gen = BlockMaskGenerator((16, 16))
    rng = np.random.default_rng(1)
    n_images, N = 16, 256
    masks, upperbound = sample_masks(n_images, N, gen, rng, (0.1, 0.5), 0.5)
    counts = masks.sum(dim=1).numpy()
    assert masks.shape == (16, 256) and masks.dtype == torch.bool
    assert (counts > 0).sum() == 8  # int(16 * 0.5) images masked
    assert (counts == 0).sum() == 8
    # Stratified: sorted masked counts fall in the successive bins of linspace(0.1, 0.5, 9) * N.
    bins = np.linspace(0.1, 0.5, 9) * N
    masked_counts = np.sort(counts[counts > 0])
    for i, c in enumerate(masked_counts):
        assert c <= int(bins[i + 1])
    assert counts.sum() <= upperbound == sum(int(N * bins[i + 1] / N) for i in range(8))
    assert masked_counts.max() > 0.35 * N  # the top bin is really reached
    assert masked_counts.min() < 0.16 * N


def test_collate_layout_weights_and_indices():
    gen = BlockMaskGenerator((2, 2), min_num_patches=1, max_num_patches=4)
    B = 3
    out = collate_data_and_masks(fake_samples(B), (0.1, 0.5), 0.5, n_tokens=4, mask_generator=gen,
                                 rng=np.random.default_rng(0))
    g, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (2 * B, 3, 28, 28) and loc.shape == (2 * B, 3, 14, 14)
    # crop-major: all images' crop 0 first, then crop 1
    assert [g[i, 0, 0, 0].item() for i in range(2 * B)] == [0, 10, 20, 1, 11, 21]
    assert [loc[i, 0, 0, 0].item() for i in range(2 * B)] == [100, 110, 120, 101, 111, 121]
    masks = out["collated_masks"]
    assert masks.shape == (2 * B, 4) and masks.dtype == torch.bool
    M = int(masks.sum())
    assert out["n_masked_patches"].tolist() == [M]
    assert out["mask_indices_list"].tolist() == [i for i, v in enumerate(masks.flatten().tolist()) if v]
    w = out["masks_weight"]
    assert w.shape == (M,)
    # each masked image's weights sum to 1
    owners = out["mask_indices_list"] // 4
    for img in owners.unique().tolist():
        assert w[owners == img].sum().item() == pytest.approx(1.0)
    assert M <= out["upperbound"]


def test_collate_accepts_dataset_pairs_and_casts():
    gen = BlockMaskGenerator((2, 2), min_num_patches=1)
    samples = [(s, ()) for s in fake_samples(2)]
    out = collate_data_and_masks(samples, n_tokens=4, mask_generator=gen, rng=np.random.default_rng(0),
                                 dtype=torch.bfloat16)
    assert out["collated_global_crops"].dtype == torch.bfloat16


def test_collate_is_deterministic_given_the_seed():
    gen = BlockMaskGenerator((16, 16))
    samples = fake_samples(8, n_local=0)
    a = collate_data_and_masks(samples, n_tokens=256, mask_generator=gen, rng=np.random.default_rng(42))
    b = collate_data_and_masks(samples, n_tokens=256, mask_generator=gen, rng=np.random.default_rng(42))
    c = collate_data_and_masks(samples, n_tokens=256, mask_generator=gen, rng=np.random.default_rng(43))
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert not torch.equal(a["collated_masks"], c["collated_masks"])
    # no hidden global RNG: reseeding numpy/torch globals changes nothing
    np.random.seed(0)
    torch.manual_seed(0)
    d = collate_data_and_masks(samples, n_tokens=256, mask_generator=gen, rng=np.random.default_rng(42))
    assert torch.equal(a["collated_masks"], d["collated_masks"])


def test_numpy_rng_from_torch_follows_the_torch_seed():
    from app.ssl.masking import numpy_rng_from_torch

    torch.manual_seed(5)
    a = numpy_rng_from_torch().integers(0, 10**9, size=3)
    torch.manual_seed(5)
    b = numpy_rng_from_torch().integers(0, 10**9, size=3)
    assert (a == b).all()
