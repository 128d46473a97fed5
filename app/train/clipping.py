"""Per-module gradient clipping under DeepSpeed ZeRO 0-3, as the reference recipe clips: the
backbone, the DINO head and the iBOT head each get `clip_grad_norm_(module, max_norm)` of the
rank-averaged gradient, independently.

    clipper = ModuleClipper(engine, max_norm=3.0)   # DeepSpeed's own clipping set to 0
    engine.backward(loss)
    norms = clipper.clip()                          # {"backbone": 4.2, "dino_head": 0.7, ...}
    engine.step()

Between `backward` and `step` every rank holds the averaged gradient, whole or in part:
- ZeRO-0: `param.grad` (fp32, or bf16 with DeepSpeed's unfused optimizer; the fp32 `_hp_grad` of
  its BF16_Optimizer), whole and identical on every rank;
- ZeRO-1/2: the fragment of each parameter that falls in this rank's partition
  (`param._hp_mapping`, DeepSpeed's tensor-fragment map), possibly none;
- ZeRO-3: the parameter's local gradient partition (`deepspeed.utils.safe_get_local_grad`).
A module's squared norm is the sum of its local squared norms, all-reduced over the process group
when the gradient is partitioned (one all-reduce of a vector with one entry per module; dinoctl's
data-parallel group is the whole world). The scale is then applied to the same local pieces, so
nothing is gathered. A norm that is not finite is returned as it is (`app/train/step.py` stops).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor `clip_grad_norm_` applies: max_norm / (norm + 1e-6), at most 1."""
    return min(1.0, max_norm / (norm + EPS))


def module_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by top-level child (`backbone`, `dino_head`, `ibot_head`)."""
    out: dict[str, list[nn.Parameter]] = {}
    for name, child in model.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if params:
            out[name] = params
    return out


class ModuleClipper:
    """Clips each top-level module of the engine's model at `max_norm` (see the module doc)."""

    def __init__(self, engine, max_norm: float, model: nn.Module | None = None):
        self.engine = engine
        self.max_norm = float(max_norm)
        self.modules = module_params(model if model is not None else engine.module)
        self.stage = int(engine.zero_optimization_stage())
        self.replicated = self.stage == 0  # every rank holds every averaged gradient

    def _local_grads(self, param: nn.Parameter) -> Iterator[Tensor]:
        """This rank's part of `param`'s averaged gradient, as tensors scaled in place."""
        if self.replicated:
            grad = getattr(param, "_hp_grad", None)  # BF16_Optimizer's fp32 accumulation
            grad = grad if grad is not None else param.grad
            if grad is not None:
                yield grad
            return
        if hasattr(param, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_grad

            grad = safe_get_local_grad(param)
            if grad is not None:
                yield grad
            return
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # no fragment of this parameter in this rank's partition
            return
        flat = mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
        address = mapping.lp_fragment_address
        if flat.numel() == param.numel() and address.numel != param.numel():
            # DeepSpeed's BF16_Optimizer keeps the whole gradient on every rank; this rank's
            # share is its fragment (as in deepspeed.utils.tensor_fragment.get_full_hp_grad)
            flat = flat.narrow(0, address.start, address.numel)
        yield flat

    def norms(self) -> dict[str, float]:
        """Each module's gradient norm (the averaged gradient, all of it). Computed on the
        gradients' device in fp32 with one host sync and at most one all-reduce."""
        device = self.engine.device if hasattr(self.engine, "device") else torch.device("cpu")
        sq = []
        for params in self.modules.values():
            parts = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device)
                     for p in params for g in self._local_grads(p)]
            sq.append(torch.stack(parts).pow(2).sum() if parts else torch.zeros((), device=device))
        vec = torch.stack(sq) if sq else torch.zeros(0, device=device)
        if not self.replicated and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        return {name: float(v) ** 0.5 for name, v in zip(self.modules, vec.cpu().tolist())}

    def clip(self) -> dict[str, float]:
        """Scale each module whose norm exceeds `max_norm`; returns the norms before clipping."""
        norms = self.norms()
        for name, norm in norms.items():
            coef = clip_coefficient(norm, self.max_norm)
            if coef >= 1.0:
                continue
            for p in self.modules[name]:
                if hasattr(p, "ds_id"):
                    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

                    grad = safe_get_local_grad(p)
                    if grad is not None:
                        safe_set_local_grad(p, grad * coef)
                    continue
                for g in self._local_grads(p):
                    g.mul_(coef)
        return norms
