"""iBOT block masking and the collate function that builds a training batch with masks.

`BlockMaskGenerator` is BEiT-style block masking: rectangles of random area and log-uniform
aspect ratio are added until the requested number of patches is masked. `collate_data_and_masks`
stacks the multi-crop samples and masks half of the global crops with stratified ratios, as in
DINOv2. Every random draw comes from the `numpy.random.Generator` passed in, so a batch is a
pure function of (samples, seed): a resumed run rebuilds exactly the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class BlockMaskGenerator:
    """Boolean block masks over a patch grid.

    input_size: (H, W) patch grid (16x16 for 224 px / patch 14). A call
    `gen(num_masking_patches, rng)` returns a [H, W] bool ndarray with at most that many
    masked patches (fewer only when no block can be placed in 10 tries).
    min_num_patches: smallest block area; max_num_patches: largest block area (default 0.5*N);
    min_aspect / max_aspect: block aspect ratio range (h / w), sampled log-uniformly;
    max_aspect defaults to 1 / min_aspect.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = (16, 16),
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: int | float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_tries: int = 10,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = int(min_num_patches)
        if max_num_patches is None:
            max_num_patches = 0.5 * self.num_patches
        self.max_num_patches = int(max_num_patches)
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.max_tries = max_tries

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator({self.height}x{self.width}, min={self.min_num_patches}, "
            f"max={self.max_num_patches}, log_aspect={self.log_aspect_ratio})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Try up to `max_tries` times to mask one new rectangle; return the patches added."""
        delta = 0
        for _ in range(self.max_tries):
            # Near the target the budget can be below min_num_patches: draw between the two.
            lo, hi = sorted((self.min_num_patches, max_mask_patches))
            target_area = rng.uniform(lo, hi)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                region = mask[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                # Accept only blocks that add something without overshooting the target.
                if 0 < new <= max_mask_patches:
                    region[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        if rng is None:
            raise ValueError("BlockMaskGenerator needs an explicit numpy Generator (rng=...) for reproducibility")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def numpy_rng_from_torch() -> np.random.Generator:
    """A numpy Generator seeded from torch's global RNG (one 63-bit draw).

    Inside a DataLoader worker torch's RNG is seeded per worker from the loader's generator, so
    `collate_data_and_masks(..., rng=numpy_rng_from_torch())` there is as reproducible as the
    augmentation; in the main process, seed torch (or pass your own Generator) instead."""
    return np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,)).item()))


def _crops_of(sample: Any) -> dict:
    """A dataset item is the augmentation dict, or a (dict, target) pair like torchvision's."""
    if isinstance(sample, dict):
        return sample
    if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], dict):
        return sample[0]
    raise TypeError(f"collate: expected a crops dict or (dict, target), got {type(sample).__name__}")


def sample_masks(
    n_images: int,
    n_tokens: int,
    mask_generator: BlockMaskGenerator,
    rng: np.random.Generator,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
) -> tuple[torch.Tensor, int]:
    """Masks for `n_images` global crops: [n_images, n_tokens] bool, and the upper bound.

    `int(n_images * mask_probability)` images are masked; image i of those targets a ratio drawn
    uniformly in [r_i, r_{i+1}] with r = linspace(lo, hi, n + 1) (stratified, so one batch covers
    the whole ratio range); the rest are unmasked; the list is then shuffled. The upper bound is
    sum_i int(N * r_{i+1}) >= the number of masked patches, for static buffer sizes.
    """
    lo, hi = float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1])
    n_masked_images = int(n_images * mask_probability)
    ratios = np.linspace(lo, hi, n_masked_images + 1)
    masks: list[np.ndarray] = []
    upperbound = 0
    for i in range(n_masked_images):
        ratio = rng.uniform(ratios[i], ratios[i + 1])
        masks.append(mask_generator(int(n_tokens * ratio), rng).reshape(-1))
        upperbound += int(n_tokens * ratios[i + 1])
    empty = np.zeros(n_tokens, dtype=bool)
    masks.extend(empty for _ in range(n_images - n_masked_images))
    order = rng.permutation(n_images)
    stacked = np.stack([masks[i] for i in order]) if n_images else np.zeros((0, n_tokens), dtype=bool)
    if stacked.shape[1] != n_tokens:
        raise ValueError(f"mask generator grid {mask_generator.get_shape()} does not have n_tokens={n_tokens} patches")
    return torch.from_numpy(stacked), upperbound


def collate_data_and_masks(
    samples: Sequence[Any],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    n_tokens: int | None = None,
    mask_generator: BlockMaskGenerator | None = None,
    rng: np.random.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Stack B multi-crop samples into one batch and draw the iBOT masks.

    samples: B items, each {"global_crops": [n_g x [3, H, W]], "local_crops": [n_l x [3, h, w]]}
    (or (that dict, target)). Returns
      collated_global_crops [n_g*B, 3, H, W]  crop-major: all images' crop 0, then crop 1, ...
      collated_local_crops  [n_l*B, 3, h, w]  crop-major
      collated_masks        [n_g*B, N] bool   True = patch replaced by the mask token
      mask_indices_list     [M] int64         flat indices of masked patches in collated_masks
      masks_weight          [M] float32       1 / n_masked(image) for each masked patch
      upperbound            int               >= M, for static-shape buffers
      n_masked_patches      [1] int64         M (a tensor so it can be all-reduced)
    rng: numpy Generator; every random choice comes from it (required).
    dtype: optional cast of the image tensors (e.g. torch.bfloat16).
    """
    if rng is None:
        raise ValueError("collate_data_and_masks needs an explicit numpy Generator (rng=...)")
    if mask_generator is None:
        raise ValueError("collate_data_and_masks needs a mask_generator")
    if n_tokens is None:
        h, w = mask_generator.get_shape()
        n_tokens = h * w
    crops = [_crops_of(s) for s in samples]
    if not crops:
        raise ValueError("collate_data_and_masks: empty batch")
    n_global = len(crops[0]["global_crops"])
    n_local = len(crops[0].get("local_crops", []))
    global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c in crops])
    if n_local:
        local_crops = torch.stack([c["local_crops"][i] for i in range(n_local) for c in crops])
    else:
        local_crops = torch.empty(0)
    if dtype is not None:
        global_crops = global_crops.to(dtype)
        local_crops = local_crops.to(dtype)

    masks, upperbound = sample_masks(
        global_crops.shape[0], n_tokens, mask_generator, rng, mask_ratio_tuple, mask_probability
    )
    mask_indices_list = masks.flatten().nonzero().flatten()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(torch.float32)  # [n_g*B]
    masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), int(mask_indices_list.numel()), dtype=torch.long),
    }
