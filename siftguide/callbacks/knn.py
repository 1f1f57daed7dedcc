"""Online evaluation: weighted kNN accuracy on frozen features (``val/knn_acc``), for every objective.

``val/acc`` itself comes from the objective (the supervised head, or MAE's stop-gradient linear probe).

kNN (Wu et al. 2018, as in DINO and solo-learn): L2-normalised features of a labelled *bank* and of *query*
images; each query votes with its ``k`` most cosine-similar bank features, weighted by ``exp(sim / T)``.
Features are the pooled final tokens of full images (class token or mean of patch tokens). The bank is a
fixed subset of the labelled training images; for unlabelled pre-training it is the first half of the
(labelled) validation subset and the queries are the second half.

The vote is a torchmetrics ``Metric`` (:class:`WeightedKNN`, as solo-learn's): each process updates it with the
features of its share of the bank and query images (every ``world``-th image), and ``compute`` gathers the shares of
all ranks (DDP) before voting over the whole bank and query sets: the same ``val/knn_acc`` as one process, in
``1 / world_size`` of the feature time.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["knn_predict", "KNNEvaluator", "WeightedKNN"]


def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Weighted kNN class predictions ``(Q,)`` for ``queries (Q, D)`` against ``bank (N, D)`` with labels ``(N,)``.

    Features are L2-normalised here; similarities are computed in chunks of ``chunk`` queries.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank (N, D) and queries (Q, D) must share D; got {tuple(bank.shape)}, {tuple(queries.shape)}")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for i in range(0, queries.shape[0], chunk):
        sim = queries[i : i + chunk] @ bank.T  # (q, N)
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


class WeightedKNN(Metric):
    """Weighted kNN accuracy (:func:`knn_predict`) of query features against a bank, gathered over processes.

    ``update(bank (n, D), bank_labels (n,), queries (q, D), query_labels (q,))`` adds a share of the rows;
    ``compute()`` votes over all of them (every rank's under DDP) and returns the accuracy."""

    full_state_update = False

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07) -> None:
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        for name in ("bank", "bank_labels", "queries", "query_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor) -> None:
        self.bank.append(bank.float())
        self.bank_labels.append(bank_labels.long())
        self.queries.append(queries.float())
        self.query_labels.append(query_labels.long())

    def compute(self) -> Tensor:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        pred = knn_predict(cat(self.bank), cat(self.bank_labels), cat(self.queries), self.num_classes, self.k,
                           self.temperature)
        return (pred == cat(self.query_labels)).float().mean()


class KNNEvaluator(L.Callback):
    """Logs ``val/knn_acc`` after each validation, and beside it ``val/knn_acc_cls`` and ``val/knn_acc_mean``
    (class token and mean of the patch tokens, from one forward pass): guidance on CLS attention shapes the class
    token directly while MAE trains it only through the decoder, so a comparison of one pooling alone may
    measure the pooling.

    Args:
        bank_size / query_size: images used (fixed subsets: the first of the training / validation sets).
        k, temperature: kNN parameters. pool: the pooling reported as ``val/knn_acc``, ``cls`` or ``mean`` (falls
            back to ``mean`` without a class token; such a model logs only ``val/knn_acc_mean``).
        batch_size: feature extraction batch size.
    """

    def __init__(self, bank_size: int = 2000, query_size: int = 2000, k: int = 20, temperature: float = 0.07,
                 pool: str = "cls", batch_size: int = 256) -> None:
        if pool not in ("cls", "mean"):
            raise ValueError(f"knn pool must be 'cls' or 'mean', got {pool!r}")
        self.bank_size, self.query_size, self.k, self.temperature = bank_size, query_size, k, temperature
        self.pool, self.batch_size = pool, batch_size

    @staticmethod
    def pools(module) -> tuple[str, ...]:
        """The poolings a model offers: ``("cls", "mean")``, or ``("mean",)`` without a class token."""
        return ("cls", "mean") if getattr(module.net, "cls_token", None) is not None else ("mean",)

    def primary_pool(self, module) -> str:
        """The pooling reported as ``val/knn_acc``: ``self.pool``, or ``mean`` where the model has no class token."""
        return self.pool if self.pool in self.pools(module) else "mean"

    @torch.no_grad()
    def features(self, module, images: Tensor, pools: tuple[str, ...] | None = None) -> Tensor:
        """``(N, len(pools) * D)``: each pooling's features side by side (default: ``self.pool`` only)."""
        pools = pools or (self.primary_pool(module),)
        n_prefix = int(getattr(module.net, "num_prefix_tokens", 1))
        out = []
        for i in range(0, len(images), self.batch_size):
            x = module.transform(images[i : i + self.batch_size].to(module.device), train=False)
            tokens = module.objective.tokens(module.net, module.transform.normalize(x))
            out.append(torch.cat([tokens[:, 0] if p == "cls" else tokens[:, n_prefix:].mean(1) for p in pools],
                                 dim=1).float())
        return torch.cat(out)

    @staticmethod
    def _images_labels(ds, n: int) -> tuple[Tensor, Tensor]:
        from ..data.protocol import take

        images, labels, kept = take(ds, range(min(n, len(ds))))  # unreadable files (image folders) stay out
        if not kept:
            raise RuntimeError(f"kNN evaluation: none of the first {n} images of {type(ds).__name__} could be read "
                               "(the warnings above name the files); fix them or set callbacks.knn=null")
        return images, labels

    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        if trainer.sanity_checking:
            return
        dm = trainer.datamodule
        if dm is None or getattr(dm, "val_set", None) is None:
            return
        qx, qy = self._images_labels(dm.val_set, self.query_size)
        bank_labelled = getattr(dm, "train_set", None) is not None and getattr(dm, "labels", True)
        if bank_labelled:
            bx, by = self._images_labels(dm.train_set, self.bank_size)
        else:
            half = len(qy) // 2
            bx, by, qx, qy = qx[:half], qy[:half], qx[half:], qy[half:]
        pools = self.pools(module)
        rank, world = trainer.global_rank, trainer.world_size  # this rank's share: every world-th image
        bx, by, qx, qy = bx[rank::world], by[rank::world], qx[rank::world], qy[rank::world]
        was_training = module.training
        module.eval()
        try:
            bank, queries = self.features(module, bx, pools), self.features(module, qx, pools)
        finally:
            module.train(was_training)
        num_classes = int(max(by.max(), qy.max())) + 1 if len(by) and len(qy) else 1
        num_classes = int(module.all_gather(torch.tensor(num_classes, device=module.device)).max())
        accs = {}
        for p, b, q in zip(pools, bank.chunk(len(pools), dim=1), queries.chunk(len(pools), dim=1)):
            metric = WeightedKNN(num_classes, self.k, self.temperature).to(module.device)
            metric.update(b, by.to(b.device), q, qy.to(b.device))
            accs[p] = metric.compute()  # gathers every rank's rows under DDP: the same value on every rank
            module.log(f"val/knn_acc_{p}", accs[p], sync_dist=True)
        module.log("val/knn_acc", accs[self.primary_pool(module)], sync_dist=True)
