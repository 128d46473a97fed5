import torch
import torch.nn.functional as F

from app.train.knn_probe import knn_accuracy


def test_weighted_knn_finds_clustered_classes():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    def draw(n):
        y = torch.arange(n) % 4
        return F.normalize(centers[y] + 0.1 * torch.randn(n, 16, generator=g), dim=1), y
    bank, bank_y = draw(80)
    queries, query_y = draw(40)
    assert knn_accuracy(bank, bank_y, queries, query_y, k=20) == 100.0
    shuffled = bank_y[torch.randperm(80, generator=g)]
    assert knn_accuracy(bank, shuffled, queries, query_y, k=20) < 60.0


def test_votes_are_weighted_by_similarity():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # one very close neighbour of class 0 outweighs two far ones of class 1 at T = 0.07
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), k=3, temperature=0.07) == 100.0
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), k=3, temperature=100.0) == 100.0
