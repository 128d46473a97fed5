"""DINOv2 multi-crop augmentation: shapes, determinism under torch's seed, blur modes, ops."""

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


def blur_rates(mode, n=400):
    aug = DataAugmentationDINO(local_crops_number=1, global_crops_size=14, local_crops_size=14, blur_mode=mode,
                               record_decisions=True)
    img = image(32, 32)
    torch.manual_seed(0)
    counts = np.zeros(3)
    for _ in range(n):
        d = aug(img)["decisions"]
        counts += [d["global_crops"][0]["blur"], d["global_crops"][1]["blur"], d["local_crops"][0]["blur"]]
    return counts / n


def test_blur_mode_switches_the_blur_probabilities():
    official = blur_rates("official")
    intended = blur_rates("intended")
    assert official[0] == 0.0 and abs(official[1] - 0.9) < 0.06 and abs(official[2] - 0.5) < 0.08
    assert intended[0] == 1.0 and abs(intended[1] - 0.1) < 0.06 and abs(intended[2] - 0.5) < 0.08


def test_solarize_only_on_second_global_crop():
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=14, local_crops_size=14, record_decisions=True)
    img = image(32, 32)
    torch.manual_seed(1)
    sol = np.zeros(4)
    for _ in range(200):
        d = aug(img)["decisions"]
        sol += [d["global_crops"][0]["solarize"], d["global_crops"][1]["solarize"]] + [
            x["solarize"] for x in d["local_crops"]
        ]
    assert sol[0] == 0 and sol[2] == 0 and sol[3] == 0
    assert 0.1 < sol[1] / 200 < 0.3


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
