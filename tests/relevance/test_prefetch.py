"""siftguide.relevance.prefetch: keypoints detected one batch ahead give the cached run; the device prefetcher
prepares each batch once and in order."""
from pathlib import Path

import numpy as np
import torch


def test_prefetched_keypoints_give_the_cached_run(tiny_cfg, monkeypatch):
    """Keypoints detected one batch ahead (relevance.prefetch; synchronous on the CPU) are those of the un-augmented
    image mapped through the augmentation, as with the cache: the same training, step for step."""
    import pandas as pd

    from siftguide.callbacks import RelevanceSetup
    from siftguide.train import train

    prefetched = []
    real = RelevanceSetup.prefetch

    def counting(module):
        prepare = real(module)
        return lambda b: (prefetched.append(1), prepare(b))[1]

    monkeypatch.setattr(RelevanceSetup, "prefetch", staticmethod(counting))

    common = ["guidance=prior", "callbacks.knn=null", "trainer.max_steps=3"]
    runs = {}
    for name, extra in (("cached", ["relevance.cache=true"]),
                        ("prefetch", ["relevance.cache=false", "relevance.prefetch=true"])):
        cfg = tiny_cfg(common + extra, name=name)
        train(cfg)
        runs[name] = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")["train/task_loss"].dropna().to_numpy()
    assert len(runs["cached"]) == 3 and len(prefetched) >= 3
    np.testing.assert_allclose(runs["prefetch"], runs["cached"], rtol=1e-5, atol=1e-6)


def test_device_prefetcher_prepares_each_batch_once_and_in_order():
    from siftguide.relevance.prefetch import DevicePrefetcher, attach

    batches = [{"image": torch.full((2, 1, 4, 4), float(i)), "index": torch.tensor([2 * i, 2 * i + 1])}
               for i in range(5)]
    prepared = []

    def prep(b):
        prepared.append(int(b["index"][0]))
        return {**b, "keypoints": b["image"] + 1}

    pf = DevicePrefetcher(batches, prep, "cpu")
    out = list(pf)
    assert len(pf) == 5 and [int(b["index"][0]) for b in out] == [0, 2, 4, 6, 8] and prepared == [0, 2, 4, 6, 8]
    assert all(torch.equal(b["keypoints"], b["image"] + 1) for b in out)

    class DM:
        def train_dataloader(self):
            return batches

    dm = DM()
    attach(dm, lambda loader: DevicePrefetcher(loader, prep, "cpu"))
    attach(dm, lambda loader: DevicePrefetcher(loader, prep, "cpu"))  # once only
    assert isinstance(dm.train_dataloader(), DevicePrefetcher) and dm.train_dataloader().loader is batches
