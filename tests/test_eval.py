import torch

from siftguide.callbacks.knn import KNNEvaluator, knn_predict


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


def test_knn_features_of_both_poolings_in_one_pass(tiny_cfg):
    from siftguide.train import build_module

    module = build_module(tiny_cfg()).eval()
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cls_only = KNNEvaluator(pool="cls", batch_size=4).features(module, images)
    mean_only = KNNEvaluator(pool="mean", batch_size=4).features(module, images)
    both = KNNEvaluator(batch_size=4).features(module, images, pools=("cls", "mean"))
    assert cls_only.shape == mean_only.shape == (6, module.net.embed_dim)
    torch.testing.assert_close(both, torch.cat([cls_only, mean_only], dim=1))
    assert not torch.allclose(cls_only, mean_only)
    assert KNNEvaluator.pools(module) == ("cls", "mean")
