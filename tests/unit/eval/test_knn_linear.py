import torch

from app.eval.knn import confusion_matrix, knn_accuracy, knn_predict_scores, per_class_accuracy
from app.eval.linear import linear_probe


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 5
    x = centers.repeat_interleave(n_per_class, 0) + spread * torch.randn(n_per_class * num_classes, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return x, y


def test_knn_separable_clusters_give_full_accuracy():
    xtr, ytr = _blobs(30, 5, 16, 0.1, 0)
    xq, yq = _blobs(10, 5, 16, 0.1, 0)  # same centers (same seed), new noise draw order
    xq = xq + 0.05 * torch.randn(xq.shape, generator=torch.Generator().manual_seed(1))
    acc = knn_accuracy(xtr, ytr, xq, yq, ks=(1, 10, 20))
    assert acc == {1: 100.0, 10: 100.0, 20: 100.0}


def test_knn_shuffled_labels_give_chance_accuracy():
    xtr, ytr = _blobs(200, 4, 8, 3.0, 2)
    perm = torch.randperm(ytr.numel(), generator=torch.Generator().manual_seed(3))
    shuffled = ytr[perm]
    xq, yq = _blobs(200, 4, 8, 3.0, 2)
    acc = knn_accuracy(xtr, shuffled, xq, yq, ks=(20,))[20]
    assert 15.0 < acc < 35.0  # chance is 25%


def test_knn_votes_are_weighted_by_exp_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_predict_scores(bank, labels, q, k=3, temperature=0.5, num_classes=2)
    # sims: 1.0 (class 0), 0.0 (class 1), 0.6 (class 1)
    expected0 = torch.exp(torch.tensor(1.0 / 0.5))
    expected1 = torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(0.6 / 0.5))
    assert torch.allclose(scores[0], torch.stack([expected0, expected1]))


def test_confusion_matrix_and_per_class_accuracy():
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 2, 2, 2, 0])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    accs = per_class_accuracy(pred, target, 3)
    assert accs[0] == 50.0 and accs[1] == 100.0 and abs(accs[2] - 200 / 3) < 1e-4


def test_linear_probe_separable_is_perfect_and_shuffled_is_chance():
    xtr, ytr = _blobs(40, 4, 12, 0.5, 5)
    xv, yv = _blobs(20, 4, 12, 0.5, 5)
    res = linear_probe(xtr, ytr, xv, yv, lrs=(0.1,), weight_decays=(0.0,), epochs=20, batch_size=64)
    assert res.top1 == 100.0
    noise = torch.randn(320, 12, generator=torch.Generator().manual_seed(9))
    labels = torch.randint(0, 4, (320,), generator=torch.Generator().manual_seed(10))
    res = linear_probe(noise[:240], labels[:240], noise[240:], labels[240:], lrs=(0.01,), epochs=10)
    assert res.top1 < 45.0  # chance is 25%; 80 samples
