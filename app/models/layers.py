"""ViT building blocks: patch embedding, attention, MLP / SwiGLU FFN, LayerScale, stochastic depth.

Module and parameter names follow the official DINOv2 checkpoints (`attn.qkv`, `attn.proj`,
`mlp.fc1`/`mlp.fc2` or `mlp.w12`/`mlp.w3`, `ls1.gamma`), so state dicts load with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Image `[B, C, H, W]` -> patch tokens `[B, (H/p)*(W/p), D]`, row-major over (height, width)."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            # The official model asserts here; cropping silently would shift features.
            raise ValueError(
                f"input of shape {tuple(x.shape)}: height and width must be multiples of "
                f"the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, N, D] -> [B, N, D]`."""
        b, n, d = x.shape
        # qkv rows are ordered (q, k, v) then heads, as in the official checkpoints;
        # one permute to [3, B, heads, N, head_dim] and unbind avoids extra copies.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (keys `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """Hidden width of the packed SwiGLU for a nominal MLP width: 2/3 of it, rounded up to 8.

    ViT-g: 4 * 1536 = 6144 -> 4096.
    """
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU with the gate and value projections packed in one Linear (keys `w12`, `w3`).

    `w12` output is `[x1 | x2]`; the FFN computes `w3(silu(x1) * x2)`.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel scale `gamma` (key `gamma`) on a residual branch."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth on a residual branch `[B, ...]`: drop whole samples with prob. `rate`.

    Kept samples are scaled by 1/(1-rate) so the expectation is unchanged.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """Pre-norm transformer block: `x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        if ffn == "mlp":
            self.mlp = Mlp(dim, hidden, bias=ffn_bias)
        elif ffn in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(hidden), bias=ffn_bias)
        else:
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = float(drop_path_rate)

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        """`[B, N, D] -> [B, N, D]`."""
        rate = self.drop_path_rate
        if not self.training or rate == 0.0:
            x = _add_scaled(x, self.ls1, self.attn(self.norm1(x)))
            return _add_scaled(x, self.ls2, self.mlp(self.norm2(x)))
        if x.shape[0] > 1 and rate > 0.1:
            # Efficient stochastic depth: run each branch only on the kept samples (saves
            # `rate` of the block's compute), add back scaled by B/kept.
            x = _residual_on_subset(x, self._attn_branch, rate)
            return _residual_on_subset(x, self._ffn_branch, rate)
        x = x + drop_path(self._attn_branch(x), rate, True)
        return x + drop_path(self._ffn_branch(x), rate, True)


def _add_scaled(x: Tensor, ls: nn.Module, y: Tensor) -> Tensor:
    """`x + ls(y)`; with LayerScale one fused `addcmul` instead of a multiply and an add."""
    if isinstance(ls, LayerScale):
        return torch.addcmul(x, y, ls.gamma)
    return x + ls(y)


def _residual_on_subset(x: Tensor, branch, rate: float) -> Tensor:
    """`x + branch(x)` on a random subset of `max(int(B*(1-rate)), 1)` samples, scaled by B/kept."""
    b = x.shape[0]
    kept = max(int(b * (1.0 - rate)), 1)
    idx = torch.randperm(b, device=x.device)[:kept]
    residual = branch(x[idx])
    return torch.index_add(x, 0, idx, residual.to(x.dtype), alpha=b / kept)
