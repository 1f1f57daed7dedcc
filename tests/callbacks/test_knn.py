"""siftguide.callbacks.knn: kNN prediction, features of both poolings in one pass, the bank (the same at every
validation, unreadable files left out), and the torchmetrics metric whose shares ranks gather."""
import pytest
import torch
from hydra.utils import instantiate

from siftguide.callbacks.knn import KNNEvaluator, WeightedKNN, knn_predict
from siftguide.train import build_module
from tests.helpers import folder_cfg, image_folder


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


def test_knn_bank_is_the_same_at_every_validation(tiny_cfg, tmp_path):
    cfg = folder_cfg(tiny_cfg, image_folder(tmp_path / "imgs"))
    dm = instantiate(cfg.data)
    dm.setup()
    module = build_module(cfg)
    knn = KNNEvaluator(bank_size=12, query_size=8, batch_size=4)
    bx1, by1 = knn._images_labels(dm.train_set, 12)
    bx2, by2 = knn._images_labels(dm.train_set, 12)
    assert torch.equal(bx1, bx2) and torch.equal(by1, by2)
    torch.testing.assert_close(knn.features(module, bx1), knn.features(module, bx2), rtol=0, atol=0)


def test_knn_bank_leaves_unreadable_files_out(tiny_cfg, tmp_path):
    cfg = folder_cfg(tiny_cfg, image_folder(tmp_path / "imgs", n=4, bad=True))
    dm = instantiate(cfg.data)
    dm.setup()
    knn = KNNEvaluator(bank_size=100, query_size=8, batch_size=4)
    bx, by = knn._images_labels(dm.train_set, 100)
    assert len(dm.train_set) == 11 and len(by) == 8  # 3 unreadable files: not black images with a label
    assert bool((bx.flatten(1).amax(1) > 0).all())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_metric_of_rank_shares_equals_the_whole_vote(world):
    """Each rank updates WeightedKNN with every world-th row (what KNNEvaluator hands it); concatenating the shares,
    as its DDP gather does, gives the accuracy of knn_predict on all rows (the vote does not depend on row order)."""
    g = torch.Generator().manual_seed(0)
    bank, by = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g)
    queries, qy = torch.randn(31, 8, generator=g), torch.randint(0, 3, (31,), generator=g)
    whole = (knn_predict(bank, by, queries, 3, k=5) == qy).float().mean()
    metric = WeightedKNN(3, k=5)
    for r in range(world):  # one process holding every rank's share: what compute() sees after the gather
        metric.update(bank[r::world], by[r::world], queries[r::world], qy[r::world])
    assert metric.compute() == whole
