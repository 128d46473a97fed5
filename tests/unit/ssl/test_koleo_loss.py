"""KoLeo: -mean log(nearest-neighbour distance) on L2-normalised features."""

import importlib
import math
import warnings

import numpy as np
import pytest
import torch

from app.ssl.koleo_loss import koleo_loss

# `app.ssl.koleo_loss` the attribute is the function (re-exported); get the module itself.
koleo_module = importlib.import_module("app.ssl.koleo_loss")


def reference(x, eps=1e-8):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        best, best_j = -np.inf, None
        for j in range(len(x)):
            if j != i and x[i] @ x[j] > best:
                best, best_j = x[i] @ x[j], j
        d = np.linalg.norm(x[i] - x[best_j] + eps)
        total += -math.log(d + eps)
    return total / len(x)


def test_hand_computed_square_on_the_circle():
    # 4 unit vectors at 90 degrees: every nearest-neighbour distance is sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_matches_explicit_nearest_neighbour_search():
    x = np.random.default_rng(0).normal(size=(7, 5))
    assert koleo_loss(torch.tensor(x, dtype=torch.float32)).item() == pytest.approx(reference(x), rel=1e-5)


def test_spread_features_have_lower_loss_than_clustered():
    rng = np.random.default_rng(1)
    clustered = rng.normal(size=(8, 4)) * 0.01 + np.array([1.0, 0, 0, 0])
    spread = rng.normal(size=(8, 4))
    assert koleo_loss(torch.tensor(spread)).item() < koleo_loss(torch.tensor(clustered)).item()


def test_batch_of_one_returns_zero_and_warns_once(monkeypatch):
    monkeypatch.setattr(koleo_module, "_warned_single", False)
    x = torch.randn(1, 8, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = koleo_loss(x)
        second = koleo_loss(x)
    assert first.item() == 0.0 and second.item() == 0.0
    assert sum("nearest neighbour" in str(w.message) for w in caught) == 1
    first.backward()  # still part of the graph
    assert torch.isfinite(x.grad).all()


def test_duplicate_samples_give_finite_loss_and_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_gradients_reach_every_sample():
    x = torch.randn(5, 6, requires_grad=True)
    koleo_loss(x).backward()
    assert (x.grad.abs().sum(1) > 0).all()


def test_bf16_input_is_computed_in_fp32():
    x = (torch.randn(6, 16) * 50).to(torch.bfloat16)
    out = koleo_loss(x)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_per_crop_sum_never_pairs_two_crops_of_the_same_image():
    from app.ssl.koleo_loss import koleo_loss_per_crop

    a = np.random.default_rng(2).normal(size=(3, 4))
    # crop 1 is an exact copy of crop 0: across crops every nearest neighbour would be at distance 0
    both = torch.tensor(np.concatenate([a, a]), dtype=torch.float32)
    assert koleo_loss_per_crop(both, 2).item() == pytest.approx(2 * reference(a), rel=1e-5)
