"""Runs: composed configs, a few optimizer steps on real Fashion-MNIST, no network."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import ROOT
from siftguide.train import train


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_guided_and_baseline_runs(tiny_cfg):
    g_cfg = tiny_cfg(name="guided")
    b_cfg = tiny_cfg(["guidance=none"], name="baseline")
    g, _ = train(g_cfg), train(b_cfg)
    gm, bm = metrics(Path(g_cfg.paths.output_dir)), metrics(Path(b_cfg.paths.output_dir))
    for m in (gm, bm):
        assert m["val/acc"].notna().any() and m["train/task_loss"].notna().sum() == 4
        assert m["val/step"].max() == 4  # validated at the final step
        assert m["val/attn_div"].notna().any()
    assert "train/guidance_loss" in gm.columns and gm["train/guidance_loss"].notna().sum() == 4
    assert "train/guidance_loss" not in bm.columns
    assert (gm["train/guidance_loss"].dropna() > 0).all()
    for cfg in (g_cfg, b_cfg):
        out = Path(cfg.paths.output_dir)
        assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "config.yaml").is_file()
    assert 0.0 <= g["val/acc"] <= 1.0


def task_losses(tiny_cfg, overrides: list[str], name: str):
    """Train a tiny config and return its per-step train/task_loss values."""
    cfg = tiny_cfg(overrides, name=name)
    train(cfg)
    return metrics(Path(cfg.paths.output_dir))["train/task_loss"].dropna().to_numpy()


def test_weight_zero_reproduces_the_baseline_exactly(tiny_cfg):
    a = task_losses(tiny_cfg, ["guidance.weight=0"], "zero")
    b = task_losses(tiny_cfg, ["guidance=none"], "base")
    assert len(a) == 4 and (a == b).all()


def test_guidance_changes_training(tiny_cfg):
    a = task_losses(tiny_cfg, ["guidance.weight=1"], "g")
    c = task_losses(tiny_cfg, ["guidance=none"], "b")
    assert a[0] == c[0]  # same init and first batch
    assert (a[1:] != c[1:]).any()  # the guidance gradient changed the weights


def test_resume_from_checkpoint(tiny_cfg):
    first = tiny_cfg(name="first")
    train(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4 and state["hyper_parameters"]["config"]["seed"] == 0
    resumed = tiny_cfg([f"ckpt_path={ckpt}", "trainer.max_steps=6"], name="resumed")
    train(resumed)
    m = metrics(Path(resumed.paths.output_dir))
    assert m["val/step"].max() == 6 and m["train/task_loss"].notna().sum() == 2
    out = Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(out, map_location="cpu", weights_only=False)["global_step"] == 6


def test_control_targets_run(tiny_cfg):
    for kind in ("shuffled", "rolled", "mean", "gradient", "uniform", "random", "foreground"):
        cfg = tiny_cfg([f"relevance.kind={kind}", "trainer.max_steps=2", "callbacks.knn=null",
                        "relevance.mean_images=64"], name=kind)
        train(cfg)
        assert metrics(Path(cfg.paths.output_dir))["train/guidance_loss"].notna().sum() == 2


def test_supervised_modes_combine_in_one_run(tiny_cfg):
    cfg = tiny_cfg(["guidance=[attention,interrelation,background,prior,token_drop]", "relevance.cache=true",
                    "relevance.cache_dir=null", "trainer.max_steps=3", "callbacks.knn=null"], name="combo")
    train(cfg)
    m = metrics(Path(cfg.paths.output_dir))
    for name in ("attention", "interrelation", "background"):
        assert m[f"train/guidance/{name}_loss"].notna().sum() == 3
    assert (m["train/tokens_kept"].dropna() == 0.5).all() and m["train/guidance/prior_beta"].notna().sum() == 3
    assert m["val/acc"].notna().any()


def test_mae_modes_combine_and_bad_combinations_fail(tiny_cfg):
    mae = ["objective=mae", "objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2",
           "callbacks.knn=null", "trainer.max_steps=2"]
    cfg = tiny_cfg([*mae, "guidance=[masking,recon_weight,attention]"], name="mae_modes")
    train(cfg)
    assert metrics(Path(cfg.paths.output_dir))["train/mae_loss"].notna().sum() == 2
    with pytest.raises(ValueError, match="token_drop cannot serve"):
        train(tiny_cfg([*mae, "guidance=token_drop"], name="bad1"))
    with pytest.raises(ValueError, match="objective=mae"):
        train(tiny_cfg(["guidance=masking", "trainer.max_steps=2"], name="bad2"))


def test_inert_token_drop_reproduces_the_baseline_exactly(tiny_cfg):
    a = task_losses(tiny_cfg, ["guidance=token_drop", "guidance.token_drop.keep=1.0"], "keep1")
    b = task_losses(tiny_cfg, ["guidance=none"], "base")
    assert len(a) == 4 and (a == b).all()


def test_misspelt_override_is_an_error(tiny_cfg):
    from hydra.errors import ConfigCompositionException as HydraCompositionError

    with pytest.raises(HydraCompositionError):
        tiny_cfg(["guidance.wieght=0.3"])
    with pytest.raises(HydraCompositionError):
        tiny_cfg(["guidance.attention.layerz=[0]"])


def test_train_py_command_line_with_wandb_offline(tmp_path):
    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    overrides = [o for o in TINY if not o.startswith("logger")] + ["trainer.max_steps=2"]
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics(out)
    assert m["val/acc"].notna().any() and "train/guidance_loss" in m.columns
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    assert (out / ".hydra" / "config.yaml").is_file()


def test_elapsed_time_includes_the_device_pipeline(tiny_cfg, monkeypatch):
    """train/elapsed_s must count on_after_batch_transfer (where SIFT runs), not only the training step."""
    import time as _time

    from siftguide.module import PretrainModule

    real = PretrainModule.on_after_batch_transfer

    def slow(self, batch, idx):
        if self.trainer.training:
            _time.sleep(0.2)
        return real(self, batch, idx)

    monkeypatch.setattr(PretrainModule, "on_after_batch_transfer", slow)
    cfg = tiny_cfg(["callbacks.knn=null"], name="slow")
    train(cfg)
    m = metrics(Path(cfg.paths.output_dir))
    assert m["train/elapsed_s"].max() >= 4 * 0.2
    # the cost axis counts compute, not waiting: the 0.8 s of sleep are wall-clock only
    cost, wall = m["train/cost_s"].max(), m["train/elapsed_s"].max()
    assert 0 < cost < wall - 0.5
    assert m["val/cost_s"].dropna().is_monotonic_increasing and m["val/cost_s"].max() <= cost + 1e-6


def test_cost_clock_counts_cpu_work_not_waiting():
    import time as _time

    from siftguide.callbacks import CostClock

    clock, cpu = CostClock(), torch.device("cpu")
    clock.start(cpu)
    _time.sleep(0.3)
    clock.mark(cpu)
    assert clock.total() < 0.1
    t0 = _time.thread_time()
    while _time.thread_time() - t0 < 0.3:  # busy: 0.3 s of this thread's CPU, however long that takes here
        pass
    clock.mark(cpu)
    assert 0.3 <= clock.total() < 1.0


def test_multirun_sweep_then_compare(tmp_path):
    """`train.py -m` over two guidance weights: one run directory each (config + metrics), then compare."""
    from siftguide.compare import main as compare_main
    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith("logger")] + ["trainer.max_steps=3", "callbacks.knn=null"]
    proc = subprocess.run([sys.executable, "train.py", "-m", "guidance.weight=0,1", *overrides,
                           f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(runs) == 2 and all((r / "config.yaml").is_file() for r in runs)
    assert [("train/guidance_loss" in metrics(r).columns) for r in runs] == [False, True]
    # each job logged to wandb in a group named after the sweep directory
    assert all(list((r / "wandb").glob("offline-run-*")) for r in runs)
    groups = {yaml.safe_load((r / "config.yaml").read_text())["logger"]["wandb"]["group"] for r in runs}
    assert groups == {"sweep"}
    out = tmp_path / "cmp"
    assert compare_main([str(sweep), "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv")
    assert list(table["group"]) == ["guidance.weight=0", "guidance.weight=1"]


def test_optuna_search_config_runs_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # 4 blocks: the search space guides up to layer -3
    overrides = [o for o in TINY if not o.startswith(("logger", "model.depth"))] + [
        "model.depth=4", "logger=csv", "trainer.max_steps=2", "callbacks.knn=null", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2"]
    proc = subprocess.run([sys.executable, "train.py", "-m", "hparams_search=optuna", *overrides,
                           f"hydra.sweep.dir={tmp_path / 'optuna'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optuna" / "optimization_results.yaml").read_text())
    assert 0.0 <= best["best_value"] <= 1.0 and "guidance.weight" in best["best_params"]


def test_mae_run_writes_knn_and_guidance(tiny_cfg):
    cfg = tiny_cfg(["objective=mae", "objective.decoder_dim=32", "objective.decoder_depth=1",
                    "objective.decoder_heads=2", "callbacks.knn.bank_size=64", "callbacks.knn.query_size=64"], name="mae")
    train(cfg)
    m = metrics(Path(cfg.paths.output_dir))
    assert m["val/knn_acc"].notna().any() and m["train/guidance_loss"].notna().sum() == 4
    assert m["val/acc"].notna().any() and m["train/mae_loss"].notna().sum() == 4
    # both poolings from one pass; val/knn_acc is the configured one (cls)
    assert m["val/knn_acc_mean"].notna().any()
    assert (m["val/knn_acc"].dropna() == m["val/knn_acc_cls"].dropna()).all()


def _png_folder(root: Path, labelled: bool, n: int = 24):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        cls = i % 2
        d = root / (f"c{cls}" if labelled else "")
        d.mkdir(parents=True, exist_ok=True)
        img = (torch.rand(40, 40, generator=g) * 60).to(torch.uint8)
        img[8 + 16 * cls : 24 + 16 * cls, 8:24] = 230  # class = where the bright square is
        Image.fromarray(img.numpy()).save(d / f"img{i}.png")


def test_unlabelled_image_folder_mae(tiny_cfg, tmp_path):
    _png_folder(tmp_path / "imgs" / "train", labelled=False)
    _png_folder(tmp_path / "imgs" / "val", labelled=True)
    cfg = tiny_cfg(["data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.labels=false",
                    "data.num_workers=0", "data.batch_size=8", "data.pin_memory=false", "num_classes=2",
                    "model.in_chans=1", "data.in_chans=1", "objective=mae", "objective.decoder_dim=32",
                    "objective.decoder_depth=1", "objective.decoder_heads=2", "callbacks.knn.bank_size=8",
                    "callbacks.knn.query_size=24", "trainer.max_steps=3"], name="folder", fashion_mnist=False)
    train(cfg)
    m = metrics(Path(cfg.paths.output_dir))
    assert m["val/knn_acc"].notna().any() and m["train/guidance_loss"].notna().sum() == 3


def test_supervised_on_unlabelled_data_is_a_clear_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg(["data=image_folder", f"data.root={tmp_path}", "data.labels=false"], name="bad",
                   fashion_mnist=False)
    with pytest.raises(ValueError, match="objective=mae"):
        train(cfg)


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
