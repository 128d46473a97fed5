"""iBOT patch loss: per-image weighting 1/n_masked, divided by the number of images."""

import numpy as np
import pytest
import torch

from app.ssl.ibot_loss import ibot_patch_loss, ibot_patch_loss_masked


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference(student, teacher, masks, temp=0.1):
    B, N, _ = student.shape
    total = 0.0
    for b in range(B):
        idx = [n for n in range(N) if masks[b, n]]
        for n in idx:
            ce = -(teacher[b, n] * np_log_softmax(student[b, n] / temp)).sum()
            total += ce / len(idx)
    return total / B


def make_case(seed=0):
    rng = np.random.default_rng(seed)
    B, N, K = 4, 6, 5
    s = rng.normal(size=(B, N, K))
    t = rng.dirichlet(np.ones(K), size=(B, N))
    masks = np.zeros((B, N), dtype=bool)
    masks[0, [0, 1, 2]] = True  # 3 masked: each weighs 1/3
    masks[2, [5]] = True  # 1 masked: weighs 1
    # images 1 and 3 unmasked, but they still count in the divisor B = 4
    return s, t, masks


def test_dense_form_matches_explicit_loops():
    s, t, m = make_case()
    got = ibot_patch_loss(torch.tensor(s), torch.tensor(t), torch.tensor(m))
    assert got.item() == pytest.approx(reference(s, t, m), rel=1e-5)


def test_masked_form_equals_dense_form():
    s, t, m = make_case(1)
    masks = torch.tensor(m)
    flat = masks.flatten().nonzero().flatten()
    K = s.shape[-1]
    weight = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    s_m = torch.tensor(s).reshape(-1, K)[flat]
    t_m = torch.tensor(t).reshape(-1, K)[flat]
    got = ibot_patch_loss_masked(s_m, t_m, weight, n_images=m.shape[0])
    assert got.item() == pytest.approx(reference(s, t, m), rel=1e-5)


def test_masked_form_ignores_padding_rows_of_static_teacher_buffer():
    s, t, m = make_case(2)
    masks = torch.tensor(m)
    flat = masks.flatten().nonzero().flatten()
    K = s.shape[-1]
    weight = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    t_m = torch.tensor(t).reshape(-1, K)[flat]
    padded_teacher = torch.cat([t_m, torch.full((3, K), 1.0 / K)])  # upperbound-sized buffer
    got = ibot_patch_loss_masked(torch.tensor(s).reshape(-1, K)[flat], padded_teacher, weight, n_images=4)
    assert got.item() == pytest.approx(reference(s, t, m), rel=1e-5)


def test_gradients_reach_masked_tokens_only():
    s = torch.randn(2, 4, 3, requires_grad=True)
    t = torch.softmax(torch.randn(2, 4, 3), -1)
    masks = torch.tensor([[True, False, True, False], [False, False, False, True]])
    ibot_patch_loss(s, t, masks).backward()
    per_token = s.grad.abs().sum(-1)
    assert (per_token[masks] > 0).all()
    assert (per_token[~masks] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_for_large_logits(dtype):
    s = ((torch.rand(2, 4, 8) * 2 - 1) * 50 / 0.1).to(dtype).requires_grad_(True)
    t = torch.softmax((torch.rand(2, 4, 8) * 2 - 1) * 50 / 0.04, -1).to(dtype)
    masks = torch.ones(2, 4, dtype=torch.bool)
    loss = ibot_patch_loss(s, t, masks)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad.float()).all()
