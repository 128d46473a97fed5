#!/usr/bin/env python
"""Benchmark one full DINOv2 training step (teacher + student + 3 losses + EMA) through the
DeepSpeed engine, and the same step in bare PyTorch; print JSON.

    python scripts/bench/train_step.py --arch vits14 --batch 2 --steps 3 --device cpu
    python scripts/bench/train_step.py --arch vitl14 --batch 32 --steps 20 --device cuda --precision bf16

Reports images/s, step time, peak memory, MFU and the engine overhead
`(engine step time - bare step time) / bare step time` (same model, batch and losses; the bare
step uses torch AdamW + clip_grad_norm_ directly). Bare and engine steps alternate and the
medians are compared, so load from other processes affects both alike. Data loading is excluded: one synthetic
multi-crop batch (random pixels, real iBOT masks) is reused.

FLOP count (matmuls only, multiply-add = 2 FLOPs), per image of the full recipe step:
  ViT forward on one crop with T = 1 + (S/p)^2 tokens, width D, depth L, FFN hidden H:
      per block  2T(3D^2 [qkv] + D^2 [proj] + 2DH [fc1, fc2])   (SwiGLU: 2T * 3DH', H' = 4096 for g)
               + 4 T^2 D [QK^T and AV]
      + patch embed 2 (T-1) 3 p^2 D
  head on one token: 2(D*h + h*h + h*b + b*K)   (h hidden, b bottleneck, K prototypes)
  teacher = fwd on 2 global crops + DINO head on 2 CLS + iBOT head on the masked patches
  student = 3 x (fwd on 2 global + n_local local crops + DINO head on 2 + n_local CLS
                 + iBOT head on the masked patches)          (backward = 2 x forward)
  masked patches per image = 2 * mask_sample_probability * mean(mask_ratio) * N = 2*0.5*0.3*N.
With 224/98 crops this gives ~2.05 TFLOP/image for ViT-L/14 and ~7.5 TFLOP/image for ViT-g/14
(the issue quotes ~2.07 and ~7.6). MFU = FLOPs/image * images/s / peak; the peak is
`--peak-tflops`, or for CUDA a table of dense bf16 peaks by device name (null on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # DeepSpeed otherwise prints its accelerator guess to stdout
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ARCH_PRESETS = {"vits14": "vits14", "vitb14": "vitb14", "vitl14": "vitl14", "vitg14": "vitg14"}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def vit_flops(tokens: int, dim: int, depth: int, ffn_hidden: int, swiglu: bool, patch: int) -> float:
    ffn = 3 * dim * ffn_hidden if swiglu else 2 * dim * ffn_hidden
    block = 2 * tokens * (3 * dim * dim + dim * dim + ffn) + 4 * tokens * tokens * dim
    return depth * block + 2 * (tokens - 1) * 3 * patch * patch * dim


def head_flops(dim: int, hidden: int, bottleneck: int, k: int) -> float:
    return 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * k)


def flops_per_image(cfg, backbone) -> float:
    p, d, depth = cfg.model.patch_size, backbone.embed_dim, len(backbone.blocks)
    swiglu = cfg.model.ffn_layer.startswith("swiglu")
    hidden = 4096 if swiglu else 4 * d
    n_g = (cfg.crops.global_crops_size // p) ** 2
    n_l = (cfg.crops.local_crops_size // p) ** 2
    g = vit_flops(1 + n_g, d, depth, hidden, swiglu, p)
    loc = vit_flops(1 + n_l, d, depth, hidden, swiglu, p)
    dino = head_flops(d, cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim, cfg.dino.head_n_prototypes)
    ib = cfg.ibot
    ibot = head_flops(d, ib.head_hidden_dim, ib.head_bottleneck_dim, ib.head_n_prototypes) \
        if ib.separate_head else dino
    masked = 2 * ib.mask_sample_probability * sum(ib.mask_ratio_min_max) / 2 * n_g
    nl = cfg.crops.local_crops_number
    teacher = 2 * g + 2 * dino + masked * ibot
    student = 3 * (2 * g + nl * loc + (2 + nl) * dino + masked * ibot)
    return teacher + student


def synthetic_batch(cfg, batch: int, seed: int = 0) -> dict:
    from app.ssl.masking import BlockMaskGenerator, collate_data_and_masks

    gen = torch.Generator().manual_seed(seed)
    gs, ls, nl = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [{"global_crops": [torch.randn(3, gs, gs, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, ls, ls, generator=gen) for _ in range(nl)]}
               for _ in range(batch)]
    grid = gs // cfg.model.patch_size
    return collate_data_and_masks(samples, tuple(cfg.ibot.mask_ratio_min_max),
                                  cfg.ibot.mask_sample_probability, grid * grid,
                                  BlockMaskGenerator((grid, grid)), rng=np.random.default_rng(seed))


def peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def timed(fn, step: int, device: torch.device) -> float:
    """Seconds for `fn(step)`, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def warm(fn, steps: int, device: torch.device) -> float:
    """Run `steps` warm-up steps; return the peak memory (MiB) they needed."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps):
        fn(i)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCH_PRESETS), default="vits14")
    ap.add_argument("--batch", type=int, default=2, help="images per step (>= 2 for KoLeo)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--set", action="append", default=[], help="config override (e.g. crops.local_crops_number=2)")
    args = ap.parse_args()


    from app.config import load_config
    from app.ssl.meta_arch import LossWeights, SSLMetaArch, build_network, register_zero3_external_params
    from app.ssl.param_groups import apply_schedules, get_params_groups
    from app.ssl.schedules import Schedules
    from app.train.clipping import module_params
    from app.train.engine import build_clipper, build_engine, init_distributed
    from app.train.step import TrainParts, train_step

    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    cfg = load_config(ARCH_PRESETS[args.arch], [f"train.batch_size_per_gpu={args.batch}",
                                                 f"train.zero_stage={args.zero_stage}",
                                                 f"train.precision={precision}", *args.set])
    dinfo = init_distributed()
    device = torch.device("cuda", dinfo.local_rank) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_batch(cfg, args.batch).items()}
    schedules = Schedules.from_config(cfg, dinfo.world_size)
    weights = LossWeights.from_config(cfg)
    result = {"arch": args.arch, "device": args.device, "precision": precision, "batch": args.batch,
              "zero_stage": args.zero_stage, "steps": args.steps,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads()}

    # -- bare PyTorch: same network, losses and EMA, torch AdamW + clip_grad_norm_ per module ---
    torch.manual_seed(0)
    student = build_network(cfg).to(device)
    meta = SSLMetaArch(student, weights).to(device)
    if dtype == torch.bfloat16:
        student.to(dtype)
    groups = get_params_groups(student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), foreach=True)

    def bare_step(step: int) -> None:
        s = schedules.at(step)
        apply_schedules(opt, s.lr, s.wd, s.last_layer_lr)
        t = meta.get_teacher_output(batch, s.teacher_temp, dtype)
        out = meta.get_student_output(student, batch, dtype)
        loss = meta.compute_losses(out, t, batch)["total_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for params in module_params(student).values():  # as the recipe (optim.clip_grad_mode)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        opt.step()
        meta.update_teacher(student, s.momentum)

    fpi = flops_per_image(cfg, student.backbone)
    bare_mem = warm(bare_step, args.warmup, device)

    # -- the engine (its own copy of the same initial network) ---------------------------------
    torch.manual_seed(0)
    e_student = build_network(cfg)
    e_meta = SSLMetaArch(e_student, weights).to(device)
    e_groups = get_params_groups(e_student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    if args.zero_stage == 3:
        register_zero3_external_params(e_student)
    engine = build_engine(e_student, e_groups, cfg, dinfo.world_size, precision)
    parts = TrainParts(engine, e_meta, schedules, args.zero_stage, dtype, build_clipper(engine, cfg))

    def engine_step(step: int) -> None:
        train_step(parts, batch, step)

    mem = warm(engine_step, args.warmup, device)
    # Interleave the two so that load from other processes hits both alike; report medians.
    bare_times, engine_times = [], []
    for i in range(args.steps):
        bare_times.append(timed(bare_step, args.warmup + i, device))
        engine_times.append(timed(engine_step, args.warmup + i, device))
    bare_s, engine_s = float(np.median(bare_times)), float(np.median(engine_times))
    images_per_s = args.batch * dinfo.world_size / engine_s
    peak = peak_tflops(args, device)
    result.update({
        "tflop_per_image": round(fpi / 1e12, 4),
        "engine_step_s": round(engine_s, 4), "bare_step_s": round(bare_s, 4),
        "engine_overhead": round((engine_s - bare_s) / bare_s, 4),
        "images_per_s": round(images_per_s, 3),
        "achieved_tflops": round(fpi * images_per_s / 1e12, 4),
        "mfu": round(fpi * images_per_s / 1e12 / peak, 4) if peak else None,
        "peak_tflops": peak,
        "engine_step_s_all": [round(t, 4) for t in engine_times],
        "bare_step_s_all": [round(t, 4) for t in bare_times],
        # CUDA: peak allocated during each path's warm-up; CPU: the process's peak RSS so far.
        "peak_memory_mb": round(mem, 1), "bare_peak_memory_mb": round(bare_mem, 1),
    })
    print(json.dumps(result, indent=2))
    from app.train.engine import shutdown

    shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
