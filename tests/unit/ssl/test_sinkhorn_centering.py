"""Teacher centering: softmax centering + EMA, and Sinkhorn-Knopp (single process and gloo)."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from app.ssl.centering import sinkhorn_knopp, softmax_center_teacher, update_center


def reference_sinkhorn(logits, temp, n_iterations=3):
    """The official algorithm in float64 numpy, written out step by step."""
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, B]
    K, B = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= K
        q /= q.sum(axis=0, keepdims=True)
        q /= B
    q *= B
    return q.T


def test_softmax_center_teacher_hand_computed():
    t = torch.tensor([[1.0, 2.0, 3.0]])
    center = torch.tensor([[0.5, 0.5, 1.5]])
    # (t - c) / 0.5 = [1, 3, 3]
    e = np.exp([1.0, 3.0, 3.0])
    expected = e / e.sum()
    got = softmax_center_teacher(t, center, teacher_temp=0.5)
    np.testing.assert_allclose(got.numpy()[0], expected, rtol=1e-6)


def test_update_center_is_an_ema_of_the_batch_mean():
    center = torch.tensor([[1.0, -1.0]])
    t = torch.tensor([[2.0, 0.0], [4.0, 2.0]])  # mean [3, 1]
    new = update_center(center, t, momentum=0.9)
    np.testing.assert_allclose(new.numpy(), [[0.9 * 1 + 0.1 * 3, 0.9 * -1 + 0.1 * 1]], rtol=1e-6)


def test_sinkhorn_matches_reference_algorithm():
    logits = np.random.default_rng(0).normal(size=(6, 10)) * 0.1
    got = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), teacher_temp=0.04).numpy()
    np.testing.assert_allclose(got, reference_sinkhorn(logits, 0.04), rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals():
    B, K = 8, 5
    logits = torch.randn(B, K)
    q = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    # The last step normalises columns of Q (samples): each sample's targets sum to 1.
    np.testing.assert_allclose(q.sum(dim=1).numpy(), np.ones(B), rtol=1e-5)
    # Prototypes get mass B/K only approximately after 3 iterations, and exactly at convergence.
    q_conv = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=200)
    np.testing.assert_allclose(q_conv.sum(dim=0).numpy(), np.full(K, B / K), rtol=1e-3)
    np.testing.assert_allclose(q_conv.sum(dim=1).numpy(), np.ones(B), rtol=1e-5)


def test_sinkhorn_is_invariant_to_a_constant_shift():
    logits = torch.randn(5, 7)
    np.testing.assert_allclose(
        sinkhorn_knopp(logits, 0.05).numpy(), sinkhorn_knopp(logits + 30.0, 0.05).numpy(), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_no_nan_for_large_logits(dtype):
    temp = 0.04
    logits = (torch.rand(16, 32) * 2 - 1) * 50  # logits / temp up to 1250: exp overflows
    logits[:, 3] = -50  # a prototype that every sample rejects: its row underflows
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        assert not np.isfinite(reference_sinkhorn(logits.double().numpy(), temp)).all()
    q = sinkhorn_knopp(logits.to(dtype), temp)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    np.testing.assert_allclose(q.sum(dim=1).numpy(), np.ones(16), rtol=1e-4)


def test_sinkhorn_ibot_variant_uses_the_given_sample_count():
    logits = torch.randn(5, 4)
    q = sinkhorn_knopp(logits, 0.1, n_samples=torch.tensor([5]))
    np.testing.assert_allclose(q.numpy(), sinkhorn_knopp(logits, 0.1).numpy(), rtol=1e-6)


def test_softmax_centering_no_nan_in_bf16():
    t = ((torch.rand(4, 64) * 2 - 1) * 50).to(torch.bfloat16)
    out = softmax_center_teacher(t, torch.zeros(1, 64), 0.04)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# Two processes over gloo must give what one process gives on the concatenated batch.
# ------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, chunks, patch_chunks, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q = sinkhorn_knopp(chunks[rank], 0.05)
        n_local = torch.tensor([patch_chunks[rank].shape[0]])
        q_patch = sinkhorn_knopp(patch_chunks[rank], 0.05, n_samples=n_local)
        center = update_center(torch.zeros(1, chunks[rank].shape[1]), chunks[rank], momentum=0.5)
        torch.save({"q": q, "q_patch": q_patch, "center": center}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_and_center_across_two_gloo_ranks_match_single_process(tmp_path):
    torch.manual_seed(0)
    full = torch.randn(8, 12)
    patches = torch.randn(7, 12)  # uneven: 3 masked patches on rank 0, 4 on rank 1
    chunks = [full[:4], full[4:]]
    patch_chunks = [patches[:3], patches[3:]]
    out = str(tmp_path / "out")
    mp.spawn(_worker, args=(2, _free_port(), chunks, patch_chunks, out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    expected = sinkhorn_knopp(full, 0.05)
    np.testing.assert_allclose(torch.cat([r["q"] for r in results]).numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
    expected_patch = sinkhorn_knopp(patches, 0.05)
    got_patch = torch.cat([r["q_patch"] for r in results])
    np.testing.assert_allclose(got_patch.numpy(), expected_patch.numpy(), rtol=1e-5, atol=1e-7)
    expected_center = update_center(torch.zeros(1, 12), full, momentum=0.5)
    for r in results:
        np.testing.assert_allclose(r["center"].numpy(), expected_center.numpy(), rtol=1e-6)


def test_sinkhorn_does_not_modify_its_input():
    logits = torch.randn(4, 6)
    before = logits.clone()
    sinkhorn_knopp(logits, 0.05)
    assert torch.equal(logits, before)
