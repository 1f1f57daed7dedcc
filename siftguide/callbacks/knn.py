"""Online evaluation: weighted kNN accuracy on frozen features (``val/knn_acc``), for every objective.

``val/acc`` itself comes from the objective (the supervised head, or MAE's stop-gradient linear probe).

kNN (Wu et al. 2018, as in DINO and solo-learn): L2-normalised features of a labelled *bank* and of *query*
images; each query votes with its ``k`` most cosine-similar bank features, weighted by ``exp(sim / T)``.
Features are the pooled final tokens of full images (class token or mean of patch tokens). The bank is a
fixed subset of the labelled training images; for unlabelled pre-training it is the first half of the
(labelled) validation subset and the queries are the second half.

Distributed (DDP): every rank extracts the features of its share of the bank and query images
(:func:`shard_rows`), the shares are all-gathered (:func:`unshard_rows` restores the order), and every rank
votes over the whole bank and query sets: the same ``val/knn_acc`` as one process, in ``1 / world_size`` of the
feature time.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_predict", "KNNEvaluator", "shard_rows", "unshard_rows"]


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


def shard_rows(n: int, rank: int, world: int) -> Tensor:
    """Indices of rank ``rank``'s share of ``n`` rows: ``rank, rank + world, ...``, padded with row ``n - 1`` to
    ``ceil(n / world)`` so that every rank holds as many rows (``all_gather`` needs equal shapes)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    per = -(-n // world)
    return torch.arange(rank, per * world, world).clamp_max(max(n - 1, 0))


def unshard_rows(gathered: Tensor, n: int) -> Tensor:
    """``(world, per, ...)`` rows all-gathered from the ranks' :func:`shard_rows` shares -> ``(n, ...)`` in the
    original order (interleaving puts the padding rows last, where they are cut off)."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:n]


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

    def all_features(self, trainer: L.Trainer, module, images: Tensor,
                     pools: tuple[str, ...] | None = None) -> Tensor:
        """Features (see :meth:`features`) of all ``images``; under DDP each rank computes its share and the shares
        are all-gathered (a collective: every rank must call it)."""
        world = trainer.world_size
        if world == 1:
            return self.features(module, images, pools)
        local = self.features(module, images[shard_rows(len(images), trainer.global_rank, world)], pools)
        return unshard_rows(module.all_gather(local), len(images))  # (world, per, D) -> (N, D)

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
        was_training = module.training
        module.eval()
        try:
            bank, queries = self.all_features(trainer, module, bx, pools), self.all_features(trainer, module, qx, pools)
        finally:
            module.train(was_training)
        num_classes = int(max(by.max(), qy.max())) + 1
        accs = {}
        for p, b, q in zip(pools, bank.chunk(len(pools), dim=1), queries.chunk(len(pools), dim=1)):
            pred = knn_predict(b, by.to(b.device), q, num_classes, self.k, self.temperature)
            accs[p] = (pred == qy.to(pred.device)).float().mean()
            module.log(f"val/knn_acc_{p}", accs[p], sync_dist=True)  # the same on every rank
        module.log("val/knn_acc", accs[self.primary_pool(module)], sync_dist=True)
