"""DINO / iBOT projection head with a weight-normalised prototype layer.

State-dict keys match official DINOv2 training checkpoints: `mlp.{0,2,4}.{weight,bias}` (or
`mlp.{weight,bias}` with one layer), `last_layer.weight_g`, `last_layer.weight_v`.

Precision: the MLP runs in the autocast / parameter dtype; the L2 bottleneck and the prototype
layer always compute in fp32 and return fp32 logits. At the teacher's temperature 0.04 a logit
error of 2^-8 (bf16) moves the softmax targets by ~1% total variation; in fp32 it is negligible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight `W = g * v / ||v||` (row norm), as plain Parameters.

    Written out rather than `torch.nn.utils.weight_norm` (deprecated, hook-based) so the keys
    stay `weight_g [out, 1]` / `weight_v [out, in]` and sharding wrappers (ZeRO-3) see ordinary
    parameters used inside this module's forward.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's default init, as the reference's prototypes keep it (U(+-1/sqrt(in)), std
        # 0.036 for in=256): the head's trunc-normal(0.02) init runs before the layer is made.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """`[..., in] -> [..., out]` in fp32 (also under autocast and with bf16 parameters)."""
        with torch.autocast(x.device.type, enabled=False):
            v = self.weight_v.float()
            # Scale the logits per prototype instead of materialising the normalised weight: same
            # result, one [out, in] temporary less (65k-131k prototypes make that hundreds of MB).
            scale = self.weight_g.float().squeeze(1) / v.norm(dim=1)
            return F.linear(x.float(), v) * scale

    @property
    def weight(self) -> Tensor:
        """The effective weight `[out, in]`."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool,
               bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    for _ in range(nlayers - 2):
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (no bias).

    Used for both the DINO (CLS) and the iBOT (masked patch) objective.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = False,
        mlp_bias: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def bottleneck(self, x: Tensor) -> Tensor:
        """`[B, in_dim] -> [B, bottleneck_dim]`, L2-normalised, in fp32."""
        x = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=-1, p=2, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, in_dim] -> logits [B, out_dim]`."""
        return self.last_layer(self.bottleneck(x))
