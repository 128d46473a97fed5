"""The DINOv2 Vision Transformer, with the official checkpoint key schema and output dict.

    model = vit_small(img_size=224)
    out = model.forward_features(images)            # dict, see `forward_features`
    outs = model.forward_features_list([g, l], [masks, None])   # multi-crop, one batch per size
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from app.models.layers import Block, PatchEmbed


def interpolate_pos_embed(
    pos_embed: Tensor, grid_hw: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> Tensor:
    """Resize the patch part of a learned `[1, 1 + M*M, D]` pos-embed to an `h x w` patch grid.

    Reproduces the official rule: bicubic in fp32 over the `[1, D, M, M]` grid (first spatial
    axis = image height), with `scale_factor=((h+offset)/M, (w+offset)/M)` when `offset != 0`
    (the legacy DINO kludge that nudges the sampling positions) or `size=(h, w)` when it is 0.
    The CLS entry is kept as is. Returns `[1, 1 + h*w, D]` in the input dtype, patches
    row-major over (height, width) like `PatchEmbed`.
    """
    h, w = grid_hw
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    dim = pos_embed.shape[-1]
    dtype = pos_embed.dtype
    pos = pos_embed.float()
    grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kw = {"scale_factor": ((h + offset) / m, (w + offset) / m)}
    else:
        kw = {"size": (h, w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    if tuple(grid.shape[-2:]) != (h, w):
        raise ValueError(f"pos-embed interpolation gave grid {tuple(grid.shape[-2:])}, want {(h, w)}")
    patches = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat((pos[:, :1], patches), dim=1).to(dtype)


class VisionTransformer(nn.Module):
    """DINOv2 ViT backbone (no classification head).

    Token layout: `[CLS, registers x R, patches x N]`; registers get no positional embedding
    (they are inserted after it is added).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 14,
        img_size: int = 518,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        init_values: float | None = 1.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.img_size = img_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        if drop_path_uniform:
            rates = [float(drop_path_rate)] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, ffn=ffn, qkv_bias=qkv_bias,
                  proj_bias=proj_bias, ffn_bias=ffn_bias, init_values=init_values,
                  drop_path_rate=r)
            for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (activation checkpointing) to save memory."""
        self.grad_checkpointing = enable

    # -- tokens ---------------------------------------------------------------------------

    def interpolate_pos_encoding(self, height: int, width: int) -> Tensor:
        """Positional embedding `[1, 1 + N, D]` for an image of `height x width` pixels."""
        h, w = height // self.patch_size, width // self.patch_size
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        return interpolate_pos_embed(self.pos_embed, (h, w), self.interpolate_offset,
                                     self.interpolate_antialias)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images `[B, 3, H, W]` (+ bool masks `[B, N]`) -> tokens `[B, 1 + R + N, D]`."""
        b, _, height, width = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks of shape {tuple(masks.shape)} do not match the "
                                 f"{tuple(x.shape[:2])} patch tokens of input {(height, width)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(height, width).to(x.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(x.dtype)
            x = torch.cat((x[:, :1], regs, x[:, 1:]), dim=1)
        return x

    def _run_blocks(self, x: Tensor, collect: set[int] | None = None) -> tuple[Tensor, list[Tensor]]:
        outputs = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if collect is not None and i in collect:
                outputs.append(x)
        return x, outputs

    # -- outputs --------------------------------------------------------------------------

    def _output_dict(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """Images `[B, 3, H, W]` -> dict: `x_norm_clstoken [B, D]`, `x_norm_regtokens [B, R, D]`,
        `x_norm_patchtokens [B, N, D]`, `x_prenorm [B, 1+R+N, D]`, `masks` (as given)."""
        x, _ = self._run_blocks(self.prepare_tokens(x, masks))
        return self._output_dict(x, masks)

    def forward_features_list(
        self, xs: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None = None
    ) -> list[dict[str, Tensor | None]]:
        """Multi-crop: one forward per group of same-size crops (no padding), one dict each."""
        if masks_list is None:
            masks_list = [None] * len(xs)
        if len(masks_list) != len(xs):
            raise ValueError(f"got {len(xs)} crop batches but {len(masks_list)} mask entries")
        return [self.forward_features(x, m) for x, m in zip(xs, masks_list)]

    def forward(self, x: Tensor, is_training: bool = False):
        """Normalised CLS token `[B, D]`; with `is_training=True` the `forward_features` dict."""
        out = self.forward_features(x)
        return out if is_training else out["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (int) or of the listed block indices.

        Each item is the patch tokens `[B, N, D]` (CLS and registers stripped), or `[B, D, h, w]`
        with `reshape=True`; with `return_class_token=True` items are `(patches, cls [B, D])`.
        """
        depth = len(self.blocks)
        wanted = range(depth - n, depth) if isinstance(n, int) else n
        wanted = [i + depth if i < 0 else i for i in wanted]
        bad = [i for i in wanted if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for depth {depth}")
        height, width = x.shape[-2:]
        tokens = self.prepare_tokens(x)
        _, outputs = self._run_blocks(tokens, set(wanted))
        if len(outputs) != len(set(wanted)):
            raise RuntimeError("internal: not every requested block output was collected")
        by_index = dict(zip(sorted(set(wanted)), outputs))
        outputs = [by_index[i] for i in wanted]
        if norm:
            outputs = [self.norm(o) for o in outputs]
        start = 1 + self.num_register_tokens
        cls = [o[:, 0] for o in outputs]
        patches = [o[:, start:] for o in outputs]
        if reshape:
            h, w = height // self.patch_size, width // self.patch_size
            patches = [p.reshape(p.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls))
        return tuple(patches)


# -- named sizes ------------------------------------------------------------------------------

ARCHS: dict[str, dict] = {
    # vit_tiny is ours (not an official DINOv2 size): 64-d heads like the others, for CPU demos.
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    # 1536-d / 24 heads (not the original 1408-d ViT-g) so heads stay 64-d; packed SwiGLU 4096.
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def _make(arch: str, **kw) -> VisionTransformer:
    return VisionTransformer(**{**ARCHS[arch], **kw})


def vit_tiny(**kw) -> VisionTransformer:
    return _make("vit_tiny", **kw)


def vit_small(**kw) -> VisionTransformer:
    return _make("vit_small", **kw)


def vit_base(**kw) -> VisionTransformer:
    return _make("vit_base", **kw)


def vit_large(**kw) -> VisionTransformer:
    return _make("vit_large", **kw)


def vit_giant2(**kw) -> VisionTransformer:
    return _make("vit_giant2", **kw)


def build_backbone(arch: str, **kw) -> VisionTransformer:
    """A backbone by name (`vit_tiny|vit_small|vit_base|vit_large|vit_giant2`); kw override."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return _make(arch, **kw)
