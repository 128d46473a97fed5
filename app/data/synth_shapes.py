"""Procedural images for the synthetic dataset: one shape/texture family per class.

Every class differs in geometry, texture and colour palette, so a small model learns them in
minutes on a CPU, while random scale, position, rotation, background and noise keep the task from
being trivial. Rendering is pure numpy on a pixel grid (~1 ms per image at 96 px).

    img = render_image(rng, class_index, width=96, height=96)   # uint8 [H, W, 3]
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

CLASS_NAMES = ("circle", "square", "triangle", "star", "stripes", "checker", "rings", "cross")
NUM_CLASSES = len(CLASS_NAMES)
# Hue centre per class, spread round the colour wheel.
_HUES = tuple(i / NUM_CLASSES for i in range(NUM_CLASSES))


def _color(rng: np.random.Generator, hue: float, sat=(0.55, 1.0), val=(0.55, 1.0)) -> np.ndarray:
    h = (hue + rng.uniform(-0.035, 0.035)) % 1.0
    rgb = colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, dtype=np.float32) * 255.0


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row [H, 1] and column [1, W] coordinates, float32, for broadcasting."""
    return (np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation gradient + a few faint blobs + pixel noise: [H, W, 3] float32."""
    c0 = _color(rng, rng.uniform(), sat=(0.0, 0.35), val=(0.2, 0.95))
    c1 = _color(rng, rng.uniform(), sat=(0.0, 0.35), val=(0.2, 0.95))
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(h, w)
    t = (np.cos(theta) * xx / w + np.sin(theta) * yy / h + 1.0) / 2.0
    bg = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.1, 0.35) * min(h, w)
        # Separable Gaussian: an outer product instead of an exp over every pixel.
        blob = np.exp(-((yy - cy) ** 2) / (2 * r * r)) * np.exp(-((xx - cx) ** 2) / (2 * r * r))
        bg += blob[..., None] * rng.uniform(-40, 40, size=3).astype(np.float32)
    return bg


def _shape_field(cls: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator):
    """Signed field (< 0 inside, roughly a distance in object radii) and a texture in [0, 1].

    `u`, `v` are pixel coordinates rotated into the object frame and divided by its radius.
    """
    r = np.sqrt(u * u + v * v)
    flat = np.zeros_like(u)
    name = CLASS_NAMES[cls]
    if name == "circle":
        return r - 1.0, flat
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8, flat
    if name == "triangle":
        # Intersection of three half-planes at 120 degrees: an equilateral triangle.
        d = np.full_like(u, -np.inf)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            d = np.maximum(d, u * np.cos(a) + v * np.sin(a) - 0.5)
        return d, flat
    if name == "star":
        phi = np.arctan2(v, u)
        edge = 0.42 + 0.58 * ((np.cos(5 * phi) + 1.0) / 2.0) ** 2  # pointed arms
        return r - edge, flat
    if name == "stripes":
        freq = rng.uniform(2.5, 4.0) * np.pi
        return np.maximum(np.abs(u), np.abs(v)) - 0.9, (np.sin(u * freq) > 0).astype(np.float32)
    if name == "checker":
        freq = rng.uniform(1.8, 2.6) * np.pi
        tex = (np.sin(u * freq) * np.sin(v * freq) > 0).astype(np.float32)
        return np.maximum(np.abs(u), np.abs(v)) - 0.85, tex
    if name == "rings":
        freq = rng.uniform(3.0, 4.5) * np.pi
        return r - 1.0, (np.sin(r * freq) > 0).astype(np.float32)
    if name == "cross":
        bar = 0.28
        arms = np.minimum(np.maximum(np.abs(u) - bar, np.abs(v) - 0.95),
                          np.maximum(np.abs(v) - bar, np.abs(u) - 0.95))
        return arms, flat
    raise ValueError(f"class index {cls} out of range [0, {NUM_CLASSES})")


def render_image(rng: np.random.Generator, cls: int | None, width: int, height: int) -> np.ndarray:
    """One image of class `cls` (None: background clutter only) as uint8 [H, W, 3]."""
    img = _background(rng, height, width)
    if cls is not None:
        radius = rng.uniform(0.3, 0.48) * min(width, height)
        cx = rng.uniform(radius * 0.8, width - radius * 0.8)
        cy = rng.uniform(radius * 0.8, height - radius * 0.8)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = _grid(height, width)
        dx, dy = xx - cx, yy - cy
        u = (np.cos(theta) * dx + np.sin(theta) * dy) / radius
        v = (-np.sin(theta) * dx + np.cos(theta) * dy) / radius
        field, tex = _shape_field(cls, u, v, rng)
        # About one pixel of anti-aliased edge.
        alpha = np.clip(0.5 - field * radius, 0.0, 1.0)[..., None]
        primary = _color(rng, _HUES[cls])
        secondary = primary * rng.uniform(0.25, 0.5)
        fg = primary + (secondary - primary) * tex[..., None]
        # Soft shading so flat shapes are not a single colour.
        fg = fg * (1.0 + 0.15 * u[..., None] * rng.uniform(-1, 1))
        img = img * (1.0 - alpha) + fg * alpha
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(3.0, 12.0))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def near_duplicate(rng: np.random.Generator, pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """A lightly perturbed copy: small crop, resize back, brightness change; plus a JPEG quality.

    Returns (uint8 [H, W, 3], jpeg quality). The copy stays visually the same image.
    """
    h, w = pixels.shape[:2]
    left, top = (int(rng.integers(0, max(1, int(0.08 * s) + 1))) for s in (w, h))
    right, bottom = (int(rng.integers(0, max(1, int(0.08 * s) + 1))) for s in (w, h))
    crop = Image.fromarray(pixels).crop((left, top, w - right, h - bottom))
    scale = rng.uniform(0.85, 1.15)
    out = crop.resize((max(8, int(round(w * scale))), max(8, int(round(h * scale)))),
                      Image.BILINEAR)
    arr = np.asarray(out).astype(np.float32) * rng.uniform(0.88, 1.12)
    return np.clip(arr, 0, 255).astype(np.uint8), int(rng.integers(55, 90))
