"""Per-module gradient clipping under DeepSpeed, checked against plain torch in the same process.

    torchrun --nproc_per_node 2 -m tests.workloads.clip_job OUT.json [--cases 0:fp32,1:fp32,...]

For each case (ZeRO stage, precision) every rank builds the same tiny three-module student
(backbone, dino_head, ibot_head) and a DeepSpeed engine through `app.train.engine` with the
per-module clipper, and runs STEPS steps on its own batch. Alongside, a plain-torch copy takes
the mean loss over every rank's batch, clips each module with `torch.nn.utils.clip_grad_norm_`
and steps the same AdamW. After clipping, each step compares DeepSpeed's whole clipped gradient
(`deepspeed.utils.safe_get_full_grad`, assembled by DeepSpeed, not by our code) and the norms our
clipper reports with the reference; after the last step the weights. Rank 0 writes OUT.json:
{case: {"grad_diff", "weight_diff", "norm_diff", "self_diff", "norms", "clipped"}}; `self_diff`
compares the clipped gradient with DeepSpeed's unclipped one times the expected scale (exact in
bf16 too, where the plain-torch fp32 reference differs by bf16 rounding).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

STEPS = 3
MAX_NORM = 3.0


class Student(nn.Module):
    """Three modules whose gradient norms sit on both sides of MAX_NORM."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 16))
        self.dino_head = nn.Linear(16, 12)
        self.ibot_head = nn.Linear(16, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        # large DINO term (its head and the backbone get clipped), small iBOT term (not clipped)
        return 400.0 * self.dino_head(h).pow(2).mean() + 0.01 * self.ibot_head(h).pow(2).mean()


def batch(step: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=g).to(dtype)


def run_case(stage: int, precision: str, world: int, rank: int) -> dict:
    import deepspeed

    from app.config import load_config
    from app.train.clipping import module_params
    from app.train.engine import build_clipper, build_engine, ds_config

    cfg = load_config("demo", [f"train.zero_stage={stage}", "train.batch_size_per_gpu=6",
                               f"optim.clip_grad={MAX_NORM}", "optim.clip_grad_mode=per_module"])
    assert ds_config(cfg, world, precision)["gradient_clipping"] == 0.0
    torch.manual_seed(0)
    student = Student()
    reference = copy.deepcopy(student)
    groups = [{"params": list(student.parameters()), "lr_multiplier": 1.0, "wd_multiplier": 1.0}]
    engine = build_engine(student, groups, cfg, world, precision)
    clipper = build_clipper(engine, cfg)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.0, weight_decay=0.0,
                                betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    for opt in (ref_opt, engine):
        groups_of = opt.param_groups if opt is ref_opt else _inner(engine).param_groups
        for g in groups_of:
            g["lr"], g["weight_decay"] = 0.05, 0.01
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = {"grad_diff": 0.0, "norm_diff": 0.0, "norms": [], "clipped": []}
    out["self_diff"] = 0.0
    for step in range(STEPS):
        loss = engine(batch(step, rank, dtype))
        engine.backward(loss)
        # DeepSpeed's own view of the averaged gradient before clipping, and the scale that
        # clip_grad_norm_ would apply to each module: exact whatever the precision
        before = {id(p): deepspeed.utils.safe_get_full_grad(p).double().clone()
                  for p in engine.module.parameters()}
        expected = {}
        for name, params in module_params(engine.module).items():
            norm = sum(before[id(p)].pow(2).sum() for p in params).sqrt().item()
            for p in params:
                expected[id(p)] = before[id(p)] * min(1.0, MAX_NORM / (norm + 1e-6))
        norms = clipper.clip()
        # the reference: mean loss over every rank's batch, each module clipped on its own
        ref_opt.zero_grad()
        ref_loss = sum(reference(batch(step, r, torch.float32)) for r in range(world)) / world
        ref_loss.backward()
        ref_norms = {name: float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM))
                     for name, params in module_params(reference).items()}
        out["norms"].append(norms)
        out["clipped"].append(sorted(n for n, v in ref_norms.items() if v > MAX_NORM))
        out["norm_diff"] = max(out["norm_diff"], *(abs(norms[n] - ref_norms[n]) / ref_norms[n]
                                                   for n in ref_norms))
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        for p in engine.module.parameters():
            full = deepspeed.utils.safe_get_full_grad(p)
            diff = (full.float() - ref_grads[names[id(p)]]).abs().max().item()
            out["grad_diff"] = max(out["grad_diff"], diff)
            scale = expected[id(p)].abs().max().item() or 1.0
            out["self_diff"] = max(out["self_diff"], (full.double() - expected[id(p)]).abs().max().item() / scale)
        engine.step()
        ref_opt.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage == 3):
        got = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    want = dict(reference.named_parameters())
    out["weight_diff"] = max((got[n] - want[n].detach()).abs().max().item() for n in want)
    engine.destroy()
    return out


def _inner(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cases", default="0:fp32,1:fp32,2:fp32,3:fp32")
    args = parser.parse_args()
    from app.train.engine import init_distributed, shutdown

    d = init_distributed(timeout_s=120)
    results = {}
    for case in args.cases.split(","):
        stage, precision = case.split(":")
        results[case] = run_case(int(stage), precision, d.world_size, d.rank)
    if d.rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
