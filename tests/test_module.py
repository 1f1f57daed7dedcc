"""siftguide.module (PretrainModule): timm's weight-decay groups, metrics reduced across ranks (evaluation only),
each rank's own random draws, batches with no readable image skipped and a dataset of them stopped."""
import pytest
import torch

from siftguide.data import collate_skipping
from siftguide.train import build_module, train
from tests.helpers import S, TrainerStub, folder_cfg, image_folder


@pytest.mark.parametrize("overrides", [["model=vit_tiny_fm"], ["model=vit_tiny_fm", "objective=mae"],
                                       ["model=vit_small_patch16_224", "guidance=[attention,prior]"],
                                       ["model=vit_tiny_fm", "+model.reg_tokens=2"]])
def test_weight_decay_groups_are_timms_and_unchanged(overrides):
    """configure_optimizers splits with timm.optim.param_groups_weight_decay (honouring no_weight_decay()): the
    same groups, in the same order, as the former rule (no decay for 1-D parameters and names ending in
    pos_embed / cls_token / reg_token / dist_token) on the project's ViTs and objectives."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONFIGS
    from siftguide.train import build_module

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train.yaml", overrides=[*overrides, "paths.output_dir=unused"])
    GlobalHydra.instance().clear()
    module = build_module(cfg)
    module._trainer = SimpleNamespace(max_steps=100, estimated_stepping_batches=100)  # all configure_optimizers reads
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    former = [p.ndim <= 1 or n.endswith(("pos_embed", "cls_token", "reg_token", "dist_token")) for n, p in params]
    assert [id(p) for p in no_decay["params"]] == [id(p) for (_, p), f in zip(params, former) if f]
    assert [id(p) for p in decay["params"]] == [id(p) for (_, p), f in zip(params, former) if not f]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == cfg.optimizer.weight_decay
    assert any(n == "net.reg_token" for n, _ in params) == ("+model.reg_tokens=2" in overrides)


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
        module.validation_step(module.on_after_batch_transfer(batch, 0), 0)
        module.test_step(module.on_after_batch_transfer(batch, 0), 0)
    train_logs = {k: v for k, v in calls.items() if k.startswith("train/")}
    eval_logs = {k: v for k, v in calls.items() if k.startswith(("val/", "test/"))}
    assert {"train/loss", "train/guidance_loss"} <= set(train_logs)
    assert {"val/loss", "val/acc", "test/loss", "test/acc"} <= set(eval_logs)
    assert all(kw.get("sync_dist") for kw in eval_logs.values()), eval_logs
    assert not any(kw.get("sync_dist") for kw in train_logs.values()), train_logs  # no per-step all-reduce


def test_ranks_draw_different_augmentation_and_token_drops(tiny_cfg):
    """Same seed on every rank (same init, one data order), but each rank's random draws must differ."""

    def draws(rank: int):
        module = build_module(tiny_cfg(["guidance=token_drop", "guidance.token_drop.random_share=1.0",
                                        "relevance.kind=random"]))
        module._trainer = TrainerStub(rank, 2)
        torch.manual_seed(0)  # what seed_everything(0) left on every rank
        module.decorrelate_ranks()
        rel, _ = module.relevance(torch.rand(4, 1, 32, 32), 8, None, None, "train")
        mode = module.guidance.modes["token_drop"]
        return torch.rand(3), rel, mode.select_tokens(rel, 0)

    r0, r0_again, r1 = draws(0), draws(0), draws(1)
    for a, b in zip(r0, r0_again):
        assert torch.equal(a, b)  # rank 0 keeps the run's seeds (a 1-process run is unchanged)
    for a, b in zip(r0, r1):
        assert not torch.equal(a, b)  # global RNG (augmentation), random relevance, token drop: all differ


def test_a_batch_of_only_unreadable_files_is_skipped_not_nan(tiny_cfg, tmp_path):
    cfg = folder_cfg(tiny_cfg, image_folder(tmp_path / "imgs"))
    module = build_module(cfg)
    samples = [{"image": torch.zeros(1, S, S, dtype=torch.uint8), "label": torch.tensor(0), "index": i,
                "valid": False} for i in range(4)]
    empty = collate_skipping(samples)
    assert empty["image"].shape == (0, 1, S, S) and len(empty["skipped_files"]) == 0  # (no paths given here)
    batch = module.on_after_batch_transfer(empty, 0)
    assert module.training_step(batch, 0) is None  # no loss: Lightning skips the optimizer step
    assert module.validation_step(batch, 0) is None  # nothing to evaluate, no error


def test_an_unreadable_dataset_stops_with_a_clear_error(tiny_cfg, tmp_path):
    root = image_folder(tmp_path / "imgs")
    for p in (root / "train").rglob("*.png"):
        p.write_bytes(b"")  # every training file empty: no batch ever has an image
    # without the check, all-empty steps would count towards max_steps and save an untrained model
    # (kNN off: its own check, no readable bank image, would stop the run first; see the kNN test above; the
    # ceiling on the skipped share off: it would stop the run after one epoch, see the test below)
    cfg = folder_cfg(tiny_cfg, root, ["trainer.max_steps=30", "callbacks.knn=null", "data.max_skip_fraction=1"],
                      name="unreadable")
    with pytest.raises(RuntimeError, match="in a row held no readable image"):
        train(cfg)
    with pytest.raises(RuntimeError, match="kNN evaluation: none of the first"):  # with kNN: the bank check
        train(folder_cfg(tiny_cfg, root, ["trainer.max_steps=30", "data.max_skip_fraction=1"],
                          name="unreadable_knn"))


def test_accuracy_is_torchmetrics_and_equals_the_former_formula():
    from siftguide.module import accuracy

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(257, 10, generator=g), torch.randint(0, 10, (257,), generator=g)
    logits[:5] = 0.0  # ties: the first class wins, as argmax
    assert torch.equal(accuracy(logits, labels), (logits.argmax(-1) == labels).float().mean())
