"""DINOv2 multi-crop augmentation: shapes, determinism under torch's seed, blur modes, ops."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from app.data.augment import (
    DataAugmentationDINO,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    random_resized_crop_box,
    solarize,
)


def image(w=120, h=90, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_output_shapes_and_dtype():
    aug = DataAugmentationDINO(local_crops_number=3, global_crops_size=56, local_crops_size=28)
    out = aug(image())
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    for x in out["global_crops"]:
        assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    for x in out["local_crops"]:
        assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    # ImageNet-normalised: values span well beyond [0, 1]
    assert out["global_crops"][0].min() < -0.5 and out["global_crops"][0].max() > 1.0


def test_accepts_grayscale_pil_and_uint8_tensor():
    aug = DataAugmentationDINO(local_crops_number=1, global_crops_size=28, local_crops_size=14)
    out = aug(image().convert("L"))
    assert out["global_crops"][0].shape == (3, 28, 28)
    out = aug(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    assert out["local_crops"][0].shape == (3, 14, 14)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 40, 50))


def test_same_torch_seed_same_crops_different_seed_different_crops():
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=42, local_crops_size=14)
    img = image()
    torch.manual_seed(7)
    a = aug(img)
    torch.manual_seed(7)
    b = aug(img)
    torch.manual_seed(8)
    c = aug(img)
    for key in ("global_crops", "local_crops"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def rates(mode, field, n=2000):
    aug = DataAugmentationDINO(blur_mode=mode)
    torch.manual_seed(0)
    out = []
    for kind in ("global1", "global2", "local"):
        hits = 0
        for _ in range(n):
            value = getattr(aug.sample_crop(90, 120, kind), field)
            hits += bool(value) if field == "solarize" else value is not None
        out.append(hits / n)
    return out


def test_blur_mode_switches_the_blur_probabilities():
    official = rates("official", "blur_sigma")
    intended = rates("intended", "blur_sigma")
    assert official[0] == 0.0 and abs(official[1] - 0.9) < 0.03 and abs(official[2] - 0.5) < 0.04
    assert intended[0] == 1.0 and abs(intended[1] - 0.1) < 0.03 and abs(intended[2] - 0.5) < 0.04


def test_solarize_only_on_second_global_crop():
    g1, g2, local = rates("official", "solarize")
    assert g1 == 0.0 and local == 0.0 and abs(g2 - 0.2) < 0.03


def test_recorded_decisions_are_the_ones_applied():
    aug = DataAugmentationDINO(local_crops_number=1, global_crops_size=28, local_crops_size=14,
                               blur_mode="official", record_decisions=True)
    img = image()
    torch.manual_seed(3)
    out = aug(img)
    d = out["decisions"]
    assert d["global_crops"][0].blur_sigma is None  # official: global crop 1 is never blurred
    for crop, params in zip(out["global_crops"] + out["local_crops"], d["global_crops"] + d["local_crops"]):
        assert torch.equal(crop, aug.apply_crop(torch.from_numpy(np.array(img)).permute(2, 0, 1), params))


def test_blur_decision_changes_the_pixels():
    aug = DataAugmentationDINO(global_crops_size=28)
    torch.manual_seed(0)
    p = aug.sample_crop(90, 120, "global1")
    img = torch.from_numpy(np.array(image())).permute(2, 0, 1)
    sharp = aug.apply_crop(img, replace(p, blur_sigma=None, jitter=None))
    blurred = aug.apply_crop(img, replace(p, blur_sigma=2.0, jitter=None))
    # blur lowers the high-frequency energy (neighbour differences)
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * sharp.diff(dim=-1).abs().mean()


def test_rejects_unknown_blur_mode():
    with pytest.raises(ValueError, match="blur_mode"):
        DataAugmentationDINO(blur_mode="sometimes")


def test_random_resized_crop_box_stays_inside_and_respects_scale():
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(90, 120, (0.05, 0.32))
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
        assert 0.04 * 90 * 120 <= h * w <= 0.34 * 90 * 120
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


@pytest.mark.parametrize("hue", [-0.5, -0.1, 0.0, 0.03, 0.1, 0.37])
def test_fast_hue_matches_torchvision(hue):
    x = torch.rand(3, 17, 23)
    x[:, 0, 0] = 0.5  # a grey pixel (zero chroma)
    np.testing.assert_allclose(adjust_hue(x, hue).numpy(), TF.adjust_hue(x, hue).numpy(), atol=1e-5)


def test_fast_colour_ops_match_torchvision():
    x = torch.rand(3, 20, 30)
    np.testing.assert_allclose(adjust_contrast(x, 1.3).numpy(), TF.adjust_contrast(x, 1.3).numpy(), atol=1e-4)
    np.testing.assert_allclose(adjust_saturation(x, 0.8).numpy(), TF.adjust_saturation(x, 0.8).numpy(), atol=1e-4)
    np.testing.assert_allclose(solarize(x).numpy(), TF.solarize(x, 128 / 255).numpy(), atol=0)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 2.0])
def test_fast_blur_matches_torchvision_kernel_9(sigma):
    x = torch.rand(3, 16, 21)
    expected = TF.gaussian_blur(x, [9, 9], [sigma, sigma])
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), expected.numpy(), atol=1e-5)


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        self.aug = DataAugmentationDINO(local_crops_number=1, global_crops_size=28, local_crops_size=14)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.aug(image(seed=i))["global_crops"][1]


def test_dataloader_workers_are_reproducible_from_the_loader_seed():
    def run(seed):
        loader = torch.utils.data.DataLoader(
            _Images(), batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(seed),
            multiprocessing_context="fork",
        )
        return torch.cat(list(loader))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
