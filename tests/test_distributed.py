"""Distributed training (DDP through Lightning): rank-safe metrics, kNN and keypoint cache.

Fast tests: the kNN shard / gather logic, the sync flags of the logged metrics, and the keypoint cache and kNN
feature gathering in 2 real gloo processes (torch.multiprocessing). Slow test: ``train.py trainer=ddp`` on 2 CPU
processes gives the validation metrics of one process with the same global batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siftguide.relevance import KeypointCache
from siftguide.data import DeviceTransform, load_fashion_mnist
from siftguide.callbacks.knn import KNNEvaluator, shard_rows, unshard_rows
from tests.conftest import ROOT, TINY
from siftguide.train import build_module, train

SIFT = dict(max_keypoints=16)


# ------------------------------------------------------------------------------------------------ kNN sharding
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
def test_shard_rows_then_gather_restores_every_row_once(n, world):
    x = torch.arange(n * 3).view(n, 3)
    shares = [shard_rows(n, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # equal shapes, as all_gather needs
    assert sorted(set(torch.cat(shares).tolist())) == list(range(n))  # every row in some share
    gathered = torch.stack([x[s] for s in shares])  # what all_gather returns: (world, per, 3)
    assert torch.equal(unshard_rows(gathered, n), x)


def test_shard_rows_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_rows(4, 2, 2)


# ------------------------------------------------------------------------------------------------ sync flags
def test_eval_metrics_are_reduced_across_ranks_train_metrics_are_not(tiny_cfg):
    module = build_module(tiny_cfg())
    calls: dict[str, dict] = {}
    module.log = lambda name, value, **kw: calls.__setitem__(name, kw)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g),
             "label": torch.arange(4), "index": torch.arange(4)}
    module.train()
    module.training_step(module.on_after_batch_transfer(batch, 0), 0)
    module.eval()
    with torch.no_grad():
        module.validation_step(module.on_after_batch_transfer(batch, 0), 0)  # batch 0: val/attn_div too
        module.test_step(module.on_after_batch_transfer(batch, 0), 0)
    train_logs = {k: v for k, v in calls.items() if k.startswith("train/")}
    eval_logs = {k: v for k, v in calls.items() if k.startswith(("val/", "test/"))}
    assert {"train/loss", "train/guidance_loss"} <= set(train_logs)
    assert {"val/loss", "val/acc", "val/attn_div", "test/loss", "test/acc"} <= set(eval_logs)
    assert all(kw.get("sync_dist") for kw in eval_logs.values()), eval_logs
    assert not any(kw.get("sync_dist") for kw in train_logs.values()), train_logs  # no per-step all-reduce


def test_ranks_draw_different_augmentation_and_token_drops(tiny_cfg):
    """Same seed on every rank (same init, one data order), but each rank's random draws must differ."""

    def draws(rank: int):
        module = build_module(tiny_cfg(["guidance=token_drop", "guidance.token_drop.random_share=1.0",
                                        "relevance.kind=random"]))
        module._trainer = _Trainer(rank, 2)
        torch.manual_seed(0)  # what seed_everything(0) left on every rank
        module.decorrelate_ranks()
        rel = module.relevance(torch.rand(4, 1, 32, 32), 8, None, None, "train")
        mode = module.guidance.modes["token_drop"]
        return torch.rand(3), rel, mode.select(rel)

    r0, r0_again, r1 = draws(0), draws(0), draws(1)
    for a, b in zip(r0, r0_again):
        assert torch.equal(a, b)  # rank 0 keeps the run's seeds (a 1-process run is unchanged)
    for a, b in zip(r0, r1):
        assert not torch.equal(a, b)  # global RNG (augmentation), random relevance, token drop: all differ


# ------------------------------------------------------------------------------------------------ 2 gloo processes
class _Trainer:
    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


class _Module:
    """What KNNEvaluator.all_features needs from a LightningModule: all_gather (here torch.distributed's)."""

    @staticmethod
    def all_gather(t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        return torch.stack(out)


def _worker(rank: int, world: int, init_file: str, images: torch.Tensor, directory: str, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import siftguide.relevance.cache as cache_mod

        detected: list[int] = []
        real = cache_mod.detect_keypoints

        def counting(x, **kw):
            detected.append(x.shape[0])
            return real(x, **kw)

        cache_mod.detect_keypoints = counting
        tf = DeviceTransform(32, crop_scale=None, hflip=False)
        built = KeypointCache.load_or_build(images, tf.resize, SIFT, tf.size, directory, batch_size=4)
        n_built = sum(detected)
        detected.clear()
        # the second call finds rank 0's file: nobody detects; the ranks get it by broadcast
        loaded = KeypointCache.load_or_build(images, tf.resize, SIFT, tf.size, directory, batch_size=4)
        knn = KNNEvaluator()
        knn.features = lambda module, x, pools=None: x.flatten(1).float() * 2  # stand-in network: the gather is tested
        feats = knn.all_features(_Trainer(rank, world), _Module(), images)
        torch.save({"built": built._tensors(), "loaded": loaded._tensors(), "n_built": n_built,
                    "n_loaded": sum(detected), "feats": feats}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cache_built_once_and_knn_features_gathered_across_2_gloo_processes(tmp_path):
    x, _ = load_fashion_mnist(split="test", download=False)
    images = x[:11]  # odd: unequal shares (6 + 5) and one padding row in the kNN gather
    # fork: the children inherit the imported modules (a spawned child re-imports lightning and timm: ~10 s)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), images, str(tmp_path / "cache"), str(tmp_path)),
                       nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    tf = DeviceTransform(32, crop_scale=None, hflip=False)
    reference = KeypointCache.build(images, tf.resize, SIFT)._tensors()  # one process, one batch
    assert [r["n_built"] for r in ranks] == [6, 5]  # each image detected once, in parallel shares
    assert [r["n_loaded"] for r in ranks] == [0, 0]
    assert len(list((tmp_path / "cache").glob("keypoints-*.pt"))) == 1  # saved once (rank 0), no temp file left
    assert not list((tmp_path / "cache").glob("*.tmp*"))
    for r in ranks:
        for got in (r["built"], r["loaded"]):
            for a, b in zip(got, reference):
                torch.testing.assert_close(a, b)
        torch.testing.assert_close(r["feats"], images.flatten(1).float() * 2)  # all rows, in order, on every rank


# ------------------------------------------------------------------------------------------------ end to end
# 2 x 16 vs 1 x 32: a training set of exactly one global batch (so the data order cannot differ), no augmentation
# (each rank draws its own), a validation set divisible by the world size (no DistributedSampler padding)
SAME = ["data.train_subset=32", "data.val_size=64", "transform.crop_scale=null", "transform.hflip=false",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "callbacks.knn.bank_size=32", "callbacks.knn.query_size=64",
        "callbacks.knn.k=5", "logger=csv"]
COMPARED = ("val/acc", "val/loss", "val/knn_acc", "val/attn_div")


@pytest.mark.slow
def test_ddp_on_2_cpu_processes_matches_one_process(tiny_cfg, tmp_path):
    one = tiny_cfg([*SAME, "data.batch_size=32"], name="one")
    single = train(one)
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PL_GLOBAL_SEED": "0"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *SAME, "data.batch_size=16", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 3
    ddp = results["metrics"]
    print("2 x 16 (DDP) vs 1 x 32:", {k: (ddp[k], single[k], abs(ddp[k] - single[k])) for k in COMPARED})
    for k in COMPARED:  # same weights up to fp32 reduction order: equal to 1e-4
        assert ddp[k] == pytest.approx(single[k], abs=1e-4), (k, ddp[k], single[k])
    # one run directory: the child process wrote its log beside rank 0's, nothing elsewhere
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    assert len(list(run_dir.rglob("metrics.csv"))) == 1
