"""DINO loss against explicit loops in numpy, and its multi-crop scaling (/ 18 by default)."""

import numpy as np
import pytest
import torch

from app.ssl.dino_loss import dino_loss, dino_multicrop_loss, dino_pair_count


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_pair_ce(student, teacher, temp):
    """Mean over images of -sum_k t_k log softmax(s / temp)_k, by explicit loops."""
    total = 0.0
    for b in range(student.shape[0]):
        logp = np_log_softmax(student[b] / temp)
        total += -sum(teacher[b, k] * logp[k] for k in range(student.shape[1]))
    return total / student.shape[0]


def test_single_pair_matches_hand_computed_cross_entropy():
    s = np.array([[1.0, 0.0, -1.0]])
    t = np.array([[0.2, 0.3, 0.5]])
    # log-softmax of [10, 0, -10]: log Z = 10 + log(1 + e^-10 + e^-20)
    log_z = 10 + np.log(1 + np.exp(-10) + np.exp(-20))
    expected = -(0.2 * (10 - log_z) + 0.3 * (0 - log_z) + 0.5 * (-10 - log_z))
    got = dino_loss([torch.tensor(s)], [torch.tensor(t)], student_temp=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sum_over_all_pairs_and_ignore_diagonal():
    rng = np.random.default_rng(0)
    students = [rng.normal(size=(4, 7)) for _ in range(3)]
    teachers = [np_softmax(rng.normal(size=(4, 7)) / 0.05) for _ in range(2)]
    full = sum(reference_pair_ce(s, t, 0.1) for s in students for t in teachers)
    no_diag = sum(
        reference_pair_ce(s, t, 0.1) for i, s in enumerate(students) for j, t in enumerate(teachers) if i != j
    )
    st = [torch.tensor(s, dtype=torch.float32) for s in students]
    tt = [torch.tensor(t, dtype=torch.float32) for t in teachers]
    assert dino_loss(st, tt).item() == pytest.approx(full, rel=1e-4)
    assert dino_loss(st, tt, ignore_diagonal=True).item() == pytest.approx(no_diag, rel=1e-4)


def test_multicrop_terms_are_divided_by_eighteen_pairs():
    rng = np.random.default_rng(1)
    B, K, n_local = 3, 5, 8
    g = rng.normal(size=(2 * B, K))
    loc = rng.normal(size=(n_local * B, K))
    t = np_softmax(rng.normal(size=(2 * B, K)) / 0.04)
    g_chunks, t_chunks = [g[:B], g[B:]], [t[:B], t[B:]]
    l_chunks = [loc[i * B : (i + 1) * B] for i in range(n_local)]
    local_expected = sum(reference_pair_ce(s, tc, 0.1) for s in l_chunks for tc in t_chunks) / 18
    # Official global term: mean over 2B rows against the swapped teacher, x 2 / 18.
    swapped = np.concatenate([t[B:], t[:B]])
    global_expected = reference_pair_ce(g, swapped, 0.1) * 2 / 18
    out = dino_multicrop_loss(
        torch.tensor(g, dtype=torch.float32), torch.tensor(loc, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    )
    assert dino_pair_count(2, 8) == 18
    assert out["dino_local_crops_loss"].item() == pytest.approx(local_expected, rel=1e-4)
    assert out["dino_global_crops_loss"].item() == pytest.approx(global_expected, rel=1e-4)
    # And the same-view pairs really are excluded: using them would change the value.
    same_view = reference_pair_ce(g_chunks[0], t_chunks[0], 0.1)
    assert abs(same_view - reference_pair_ce(g_chunks[0], t_chunks[1], 0.1)) > 1e-3


def test_gradients_reach_every_student_crop():
    B, K = 2, 6
    g = torch.randn(2 * B, K, requires_grad=True)
    loc = torch.randn(4 * B, K, requires_grad=True)
    t = torch.softmax(torch.randn(2 * B, K), dim=-1)
    out = dino_multicrop_loss(g, loc, t)
    (out["dino_local_crops_loss"] + out["dino_global_crops_loss"]).backward()
    assert g.grad is not None and loc.grad is not None
    assert (g.grad.abs().sum(dim=1) > 0).all()
    assert (loc.grad.abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_for_large_logits(dtype):
    temp = 0.1
    s = (torch.rand(4, 16) * 2 - 1) * 50 / temp
    s[:, 0] = 50 / temp
    s[:, 1] = -50 / temp
    t = torch.softmax((torch.rand(4, 16) * 2 - 1) * 50 / 0.04, dim=-1)
    s = s.to(dtype).requires_grad_(True)
    loss = dino_loss([s], [t.to(dtype)], student_temp=temp)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert torch.isfinite(s.grad.float()).all()
