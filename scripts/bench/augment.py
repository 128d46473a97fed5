"""Benchmark: DINOv2 multi-crop augmentation throughput per CPU core.

Single process, torch threads = 1. Source images are synthetic (smooth gradients + shapes +
noise, 256-500 px per side, made with PIL, no downloads), JPEG-encoded in memory. Measures
images/s for 2 x 224 + 8 x 98 crops, with and without JPEG decode, both per CPU-second
(`process_time`, robust on a shared machine) and per wall-second. Target: >= 35 images/s/core.

    python scripts/bench/augment.py [--images 200] [--blur-mode official]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from app.data.augment import DataAugmentationDINO  # noqa: E402

TARGET = 35.0


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(256, 501, size=2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * rng.uniform(80, 255, size=3)
        base += rng.normal(0, 12, size=base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
            fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def reference_pipeline(blur_mode: str):
    """The recipe written the plain way: torchvision transforms on PIL images, one crop at a time
    (how the official code does it). Only for comparison."""
    from torchvision import transforms as T

    from app.data.augment import BLUR_PROBABILITIES, IMAGENET_MEAN, IMAGENET_STD

    p1, p2, pl = BLUR_PROBABILITIES[blur_mode]

    def chain(size, scale, blur_p, solarize_p):
        ops = [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p),
        ]
        if solarize_p:
            ops.append(T.RandomSolarize(128, p=solarize_p))
        ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return T.Compose(ops)

    g1 = chain(224, (0.32, 1.0), p1, 0.0)
    g2 = chain(224, (0.32, 1.0), p2, 0.2)
    local = chain(98, (0.05, 0.32), pl, 0.0)
    return lambda img: {"global_crops": [g1(img), g2(img)], "local_crops": [local(img) for _ in range(8)]}


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


def measure(fn, items) -> dict:
    fn(items[0])  # warm-up
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for item in items:
        fn(item)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "images": len(items),
        "images_per_cpu_second": round(len(items) / cpu, 2),
        "images_per_wall_second": round(len(items) / wall, 2),
        "ms_per_image_cpu": round(1e3 * cpu / len(items), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--blur-mode", default="official", choices=["official", "intended"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the plain torchvision-on-PIL baseline")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    jpegs = synthetic_jpegs(args.images, args.seed)
    decoded = [decode(b) for b in jpegs]
    aug = DataAugmentationDINO(blur_mode=args.blur_mode)  # 2 x 224 + 8 x 98

    no_decode = measure(aug, decoded)
    with_decode = measure(lambda b: aug(decode(b)), jpegs)
    decode_only = measure(decode, jpegs)
    reference = None
    if not args.no_reference:
        reference = measure(reference_pipeline(args.blur_mode), decoded[: max(20, len(decoded) // 4)])
    result = {
        "bench": "augment",
        "crops": "2x224 + 8x98",
        "blur_mode": args.blur_mode,
        "torch_threads": torch.get_num_threads(),
        "source_px": "256-500 per side, JPEG q90",
        "without_decode": no_decode,
        "with_decode": with_decode,
        "decode_only": decode_only,
        "reference_torchvision_pil_without_decode": reference,
        "target_images_per_core": TARGET,
        "meets_target": no_decode["images_per_cpu_second"] >= TARGET
        and with_decode["images_per_cpu_second"] >= TARGET,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
