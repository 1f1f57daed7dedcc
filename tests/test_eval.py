import torch

from siftguide.eval import knn_predict


def test_knn_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 5
    bank_y = torch.arange(5).repeat_interleave(40)
    bank = centers[bank_y] + torch.randn(200, 32, generator=g)
    q_y = torch.arange(5).repeat_interleave(20)
    queries = centers[q_y] + torch.randn(100, 32, generator=g)
    pred = knn_predict(bank, bank_y, queries, num_classes=5, k=10, chunk=7)
    assert (pred == q_y).float().mean() > 0.95
    # random labels give chance-level accuracy
    shuffled = bank_y[torch.randperm(200, generator=g)]
    assert (knn_predict(bank, shuffled, queries, 5, k=10) == q_y).float().mean() < 0.5


def test_knn_weights_votes_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    # two weak votes for class 1 vs one near-identical vote for class 0: the temperature makes similarity win
    assert knn_predict(bank, labels, torch.tensor([[1.0, 0.05]]), 2, k=3, temperature=0.05).item() == 0
