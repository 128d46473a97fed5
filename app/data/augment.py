"""DINOv2 multi-crop augmentation, fast on CPU.

`DataAugmentationDINO(image)` returns {"global_crops": [2 x [3, 224, 224]], "local_crops":
[n x [3, 98, 98]]} float32, ImageNet-normalised, following the official recipe:

| step              | global crop 1      | global crop 2      | each local crop    |
|-------------------|--------------------|--------------------|--------------------|
| geometric         | RandomResizedCrop(224, scale 0.32-1, bicubic) + HFlip 0.5; local: 98, 0.05-0.32 |
| colour jitter     | p=0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (random order)      |
| grayscale         | p=0.2              | p=0.2              | p=0.2              |
| Gaussian blur     | official: p=0.0    | official: p=0.9    | p=0.5              |
| (kernel 9, sigma  | intended: p=1.0    | intended: p=0.1    |                    |
|  in [0.1, 2.0])   |                    |                    |                    |
| solarize (>=128)  | -                  | p=0.2              | -                  |

The blur quirk: the official `GaussianBlur(p)` hands `1 - p` to `RandomApply` (its comment wrongly
says torchvision inverts it), so the released models were trained with the *inverted*
probabilities of the BYOL/DINO recipe: never blur global crop 1, blur global crop 2 90% of the
time. `blur_mode="official"` (default) reproduces what the released models saw (the maintainers
asked to keep it, dinov2 PR #411, dinov3 #286); `blur_mode="intended"` gives the paper's 1.0 / 0.1.

Speed (about 2.5x the plain torchvision-on-PIL pipeline, see scripts/bench/augment.py): the
crop + resize runs on the uint8 image (antialiased bicubic, like PIL); every colour op is then a
few float32 tensor operations without branches (`torch.where` is slow on CPU); the separable 9x9
blur accumulates shifted slices in place (faster than a depthwise conv). Values are not
re-quantised to uint8 between ops as PIL does, so results differ from it by rounding only.

Randomness: every decision comes from torch's global RNG (a fixed number of draws per crop), so
`torch.manual_seed` (or the per-worker seed a DataLoader sets) makes the output reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as PIL's "L" conversion and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)

BLUR_PROBABILITIES = {
    # (global crop 1, global crop 2, local crops)
    "official": (0.0, 0.9, 0.5),
    "intended": (1.0, 0.1, 0.5),
}


# ------------------------------------------------------------------------------------------------
# Pure ops on float images x: [3, H, W] in [0, 1].
# ------------------------------------------------------------------------------------------------


def _gray(x: Tensor) -> Tensor:
    """[3, H, W] -> [1, H, W] luma."""
    return (x[0:1] * _LUMA[0]).add_(x[1:2], alpha=_LUMA[1]).add_(x[2:3], alpha=_LUMA[2])


def adjust_brightness(x: Tensor, factor: float) -> Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: float) -> Tensor:
    mean = float(_gray(x).mean())
    return (x * factor).add_((1.0 - factor) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: float) -> Tensor:
    return (x * factor).add_(_gray(x), alpha=1.0 - factor).clamp_(0.0, 1.0)


_HSV_N = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def adjust_hue(x: Tensor, hue_factor: float) -> Tensor:
    """Rotate the HSV hue by `hue_factor` turns (in [-0.5, 0.5]), keeping S and V.

    Same result as torchvision's adjust_hue, computed branch-free: RGB -> (V, C, H) with the
    usual sector formula, then the closed-form HSV -> RGB `f(n) = V - C * clamp(min(k, 4-k), 0, 1)`
    with `k = (n + H) mod 6`, H in sector units.
    """
    r, g, b = x[0], x[1], x[2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = 1.0 / chroma.clamp(min=1e-12)  # chroma 0: grey, the hue does not matter
    is_r = (maxc == r).float()
    is_g = (maxc == g).float().mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    hue = (g - b).mul_(is_r)
    hue.add_((b - r).add_(2.0 * chroma).mul_(is_g))
    hue.add_((r - g).add_(4.0 * chroma).mul_(is_b))
    hue.mul_(inv).add_(6.0 * hue_factor + 6.0)  # in sector units, shifted, >= 0
    k = _HSV_N.to(x.device) + hue  # [3, H, W], then k mod 6 (floor is cheaper than remainder)
    k.sub_(torch.floor(k * (1.0 / 6.0)).mul_(6.0))
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc - chroma * weight


def to_grayscale(x: Tensor) -> Tensor:
    return _gray(x).expand(3, -1, -1).contiguous()


def gaussian_kernel1d(sigma: float, kernel_size: int = 9) -> list[float]:
    """torchvision's Gaussian kernel: exp(-t^2 / 2 sigma^2) at t = -r..r, normalised."""
    half = (kernel_size - 1) * 0.5
    t = [-half + i for i in range(kernel_size)]
    k = [math.exp(-0.5 * (v / sigma) ** 2) for v in t]
    total = sum(k)
    return [v / total for v in k]


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 9) -> Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's kernel), [3, H, W].

    Each pass is `kernel_size` shifted slices of the padded image accumulated in place, which
    on CPU beats a depthwise conv2d several times over."""
    kernel = gaussian_kernel1d(sigma, kernel_size)
    r = kernel_size // 2
    _, h, w = x.shape
    if min(h, w) <= r:
        raise ValueError(f"gaussian_blur: image {h}x{w} too small for kernel {kernel_size}")
    padded = F.pad(x.unsqueeze(0), (r, r, r, r), mode="reflect")[0]
    rows = padded[:, :, 0:w] * kernel[0]
    for i in range(1, kernel_size):
        rows.add_(padded[:, :, i : i + w], alpha=kernel[i])
    out = rows[:, 0:h, :] * kernel[0]
    for i in range(1, kernel_size):
        out.add_(rows[:, i : i + h, :], alpha=kernel[i])
    return out


def solarize(x: Tensor, threshold: float = 128.0 / 255.0) -> Tensor:
    """Invert pixels >= threshold (PIL's solarize at 128 on the uint8 scale)."""
    flip = (x >= threshold).float()
    return x + flip * (1.0 - 2.0 * x)


# ------------------------------------------------------------------------------------------------
# Random parameters (torch's global RNG only).
# ------------------------------------------------------------------------------------------------


def random_resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with aspect `ratio` (w / h),
    log-uniform; 10 tries, then the largest central crop within the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    draws = torch.rand(10, 4).tolist()
    for u_area, u_ratio, u_top, u_left in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_uint8_chw(image) -> Tensor:
    """PIL image / HWC uint8 ndarray / [3, H, W] uint8 tensor -> [3, H, W] uint8 tensor."""
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"augment: tensor image must be uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        return image
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = np.array(image)  # a writable copy, HWC
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return torch.from_numpy(image).permute(2, 0, 1)  # channels-last view, no copy
    raise ValueError(
        f"augment: expected an RGB PIL image, uint8 HWC array or [3, H, W] tensor, got {type(image).__name__}"
    )


@dataclass(frozen=True)
class CropParams:
    """Every random choice for one crop (what `record_decisions` returns)."""

    box: tuple[int, int, int, int]  # top, left, height, width in the source image
    size: int  # output side
    flip: bool
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue
    jitter_order: tuple[int, ...]  # order of the 4 jitter ops (indices into the tuple above)
    grayscale: bool
    blur_sigma: float | None  # None: no blur
    solarize: bool


class DataAugmentationDINO:
    """Multi-crop augmentation of DINOv2 (see the module docstring for the recipe and quirk).

    Call with an RGB PIL image (or uint8 [3, H, W] tensor / HWC array). Returns
    {"global_crops": [2 x float32 [3, S_g, S_g]], "local_crops": [n x float32 [3, S_l, S_l]]},
    plus "decisions" ({"global_crops": [CropParams x 2], "local_crops": [CropParams x n]}) when
    `record_decisions=True`.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        blur_mode: str = "official",
        record_decisions: bool = False,
    ):
        if blur_mode not in BLUR_PROBABILITIES:
            raise ValueError(f"blur_mode must be one of {', '.join(BLUR_PROBABILITIES)}, got {blur_mode!r}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_mode = blur_mode
        self.blur_p_global1, self.blur_p_global2, self.blur_p_local = BLUR_PROBABILITIES[blur_mode]
        self.record_decisions = record_decisions
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @classmethod
    def from_config(cls, crops, record_decisions: bool = False) -> "DataAugmentationDINO":
        """From `app.config.CropsConfig`."""
        return cls(
            global_crops_scale=crops.global_crops_scale,
            local_crops_scale=crops.local_crops_scale,
            local_crops_number=crops.local_crops_number,
            global_crops_size=crops.global_crops_size,
            local_crops_size=crops.local_crops_size,
            blur_mode=crops.blur_mode,
            record_decisions=record_decisions,
        )

    def __repr__(self) -> str:
        return (
            f"DataAugmentationDINO(global {self.global_crops_size}px {self.global_crops_scale}, "
            f"{self.local_crops_number} local {self.local_crops_size}px {self.local_crops_scale}, "
            f"blur_mode={self.blur_mode})"
        )

    def sample_crop(self, height: int, width: int, kind: str) -> CropParams:
        """Draw every random choice for one crop of a `height` x `width` image.

        kind: "global1", "global2" or "local". A fixed number of draws per crop keeps the RNG
        stream independent of the decisions taken."""
        if kind == "local":
            size, scale, blur_p, solarize_p = self.local_crops_size, self.local_crops_scale, self.blur_p_local, 0.0
        elif kind in ("global1", "global2"):
            size, scale = self.global_crops_size, self.global_crops_scale
            blur_p = self.blur_p_global1 if kind == "global1" else self.blur_p_global2
            solarize_p = 0.2 if kind == "global2" else 0.0
        else:
            raise ValueError(f"unknown crop kind {kind!r}")
        box = random_resized_crop_box(height, width, scale)
        (u_flip, u_jitter, u_bright, u_contrast, u_sat, u_hue, u_gray, u_blur, u_sigma, u_sol) = torch.rand(10).tolist()
        order = tuple(torch.randperm(4).tolist())
        jitter = None
        if u_jitter < 0.8:
            jitter = (0.6 + 0.8 * u_bright, 0.6 + 0.8 * u_contrast, 0.8 + 0.4 * u_sat, -0.1 + 0.2 * u_hue)
        return CropParams(
            box=box,
            size=size,
            flip=u_flip < 0.5,
            jitter=jitter,
            jitter_order=order,
            grayscale=u_gray < 0.2,
            blur_sigma=0.1 + 1.9 * u_sigma if u_blur < blur_p else None,
            solarize=u_sol < solarize_p,
        )

    def apply_crop(self, image: Tensor, p: CropParams) -> Tensor:
        """uint8 [3, H, W] -> normalised float32 [3, size, size] under the drawn parameters."""
        top, left, h, w = p.box
        x = TF.resized_crop(image, top, left, h, w, [p.size, p.size], InterpolationMode.BICUBIC, antialias=True)
        x = x.float().mul_(1.0 / 255.0)
        if p.flip:
            x = x.flip(-1)
        if p.jitter is not None:
            ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
            for op in p.jitter_order:
                x = ops[op](x, p.jitter[op])
        if p.grayscale:
            x = to_grayscale(x)
        if p.blur_sigma is not None:
            x = gaussian_blur(x, p.blur_sigma)
        if p.solarize:
            x = solarize(x)
        return x.sub_(self._mean).div_(self._std)

    def __call__(self, image) -> dict:
        img = _to_uint8_chw(image)
        _, height, width = img.shape
        kinds = ["global1", "global2"] + ["local"] * self.local_crops_number
        params = [self.sample_crop(height, width, kind) for kind in kinds]
        crops = [self.apply_crop(img, p) for p in params]
        out = {"global_crops": crops[:2], "local_crops": crops[2:]}
        if self.record_decisions:
            out["decisions"] = {"global_crops": params[:2], "local_crops": params[2:]}
        return out
