"""siftguide.train: runs of the composed config (a few optimizer steps on real Fashion-MNIST, no network), the off
switches bit-identical to the baseline, resume from a checkpoint, every control and mode combination, build-time
errors, the entry point. The command line in a subprocess: tests/e2e/test_train_command.py."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from siftguide.train import build, build_module, train


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_guided_and_baseline_runs(tiny_run):
    guided, baseline = tiny_run(), tiny_run(["guidance=none"])  # the session's shared runs of these configs
    g_cfg, b_cfg, g = guided.cfg, baseline.cfg, guided.final
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


def shared_task_losses(tiny_run, overrides: list[str]):
    """The per-step train/task_loss values of the session's shared run of a tiny config."""
    return tiny_run(overrides).metrics()["train/task_loss"].dropna().to_numpy()


def test_weight_zero_reproduces_the_baseline_exactly(tiny_cfg, tiny_run):
    a = task_losses(tiny_cfg, ["guidance.weight=0"], "zero")
    b = shared_task_losses(tiny_run, ["guidance=none"])
    assert len(a) == 4 and (a == b).all()


def test_guidance_changes_training(tiny_run):
    assert tiny_run().cfg.guidance.weight == 1  # the default guided run: guidance.weight=1
    a = shared_task_losses(tiny_run, [])
    c = shared_task_losses(tiny_run, ["guidance=none"])
    assert a[0] == c[0]  # same init and first batch
    assert (a[1:] != c[1:]).any()  # the guidance gradient changed the weights


def test_resume_from_checkpoint(tiny_cfg, tiny_run):
    first = tiny_run().cfg  # the shared guided run, read only: the resumed run writes into its own directory
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4 and state["hyper_parameters"]["config"]["seed"] == 0
    # the checkpoint's own keypoint-cache setting (the run lives in another tmp directory than this test's)
    resumed = tiny_cfg([f"ckpt_path={ckpt}", "trainer.max_steps=6", f"relevance.cache_dir={first.relevance.cache_dir}"],
                       name="resumed")
    train(resumed)
    m = metrics(Path(resumed.paths.output_dir))
    assert m["val/step"].max() == 6 and m["train/task_loss"].notna().sum() == 2
    out = Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(out, map_location="cpu", weights_only=False)["global_step"] == 6


# one run per control: the mean map (set up from the training images) in the default suite, the others in the e2e
# run (each control's map is checked by tests/relevance/test_stage.py in the default suite)
@pytest.mark.parametrize("kind", [k if k == "mean" else pytest.param(k, marks=pytest.mark.e2e) for k in (
    "shuffled", "rolled", "mean", "gradient", "uniform", "random", "foreground")])
def test_control_targets_run(tiny_cfg, kind):
    cfg = tiny_cfg([f"relevance.kind={kind}", "trainer.max_steps=2", "callbacks.knn=null",
                    "relevance.mean_images=64"], name=kind)
    train(cfg)
    assert metrics(Path(cfg.paths.output_dir))["train/guidance_loss"].notna().sum() == 2


def test_supervised_modes_combine_in_one_run(tiny_cfg):
    # token dropping with a per-image budget: the mean keep stays 0.5, the blocks run 0.75 (budget_range 1.5x)
    cfg = tiny_cfg(["guidance=[attention,interrelation,background,prior,token_drop]", "relevance.cache=true",
                    "relevance.cache_dir=null", "trainer.max_steps=3", "callbacks.knn=null",
                    "guidance.token_drop.budget=entropy"], name="combo")
    train(cfg)
    m = metrics(Path(cfg.paths.output_dir))
    for name in ("attention", "interrelation", "background"):
        assert m[f"train/guidance/{name}_loss"].notna().sum() == 3
    assert (m["train/tokens_kept"].dropna() == 0.5).all() and m["train/guidance/prior_beta"].notna().sum() == 3
    assert (m["train/tokens_run"].dropna() == 0.75).all() and m["train/tokens_run"].notna().sum() == 3
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


def test_inert_token_drop_reproduces_the_baseline_exactly(tiny_cfg, tiny_run):
    a = task_losses(tiny_cfg, ["guidance=token_drop", "guidance.token_drop.keep_ratio=1.0"], "keep1")
    b = shared_task_losses(tiny_run, ["guidance=none"])
    assert len(a) == 4 and (a == b).all()


def test_misspelt_override_is_an_error(tiny_cfg):
    from hydra.errors import ConfigCompositionException as HydraCompositionError

    with pytest.raises(HydraCompositionError):
        tiny_cfg(["guidance.wieght=0.3"])
    with pytest.raises(HydraCompositionError):
        tiny_cfg(["guidance.attention.layerz=[0]"])


def test_mae_run_writes_knn_and_guidance(mae_run):
    # the shared MAE run (exported by tests/analysis/test_export.py): objective=mae, decoder 32 wide, 1 block, 2
    # heads, kNN bank and queries of 64
    cfg = mae_run.cfg
    assert cfg.objective.decoder_dim == 32 and cfg.callbacks.knn.bank_size == 64 and cfg.trainer.max_steps == 4
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


@pytest.mark.parametrize("overrides, match", [
    (["guidance.attention.layers=[5]"], r"layer index 5 out of range for a model with 2 blocks \(use -2..1\)"),
    (["guidance.attention.heads=[2]"], r"heads \[2\] out of range for 2 heads"),
    (["guidance=interrelation", "guidance.interrelation.layers=[-3]"], "layer index -3 out of range"),
    (["guidance=prior", "guidance.prior.layers=[2]"], "layer index 2 out of range"),
])
def test_guidance_layers_and_heads_out_of_range_fail_at_build(tiny_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_cfg(overrides))


def test_attention_divergence_layers_out_of_range_fail_before_training(tiny_cfg):
    cfg = tiny_cfg(["callbacks.attention_divergence.layers=[7]", "callbacks.knn=null"], name="divlayers")
    with pytest.raises(ValueError, match="layer index 7 out of range"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # no step was taken


def test_compile_switch_compiles_the_blocks(tiny_cfg, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    build_module(tiny_cfg(["compile=true"]))
    assert compiled == ["Block", "Block"]  # TINY: 2 blocks
    compiled.clear()
    build_module(tiny_cfg())
    assert compiled == []


def test_siftguide_train_console_script(monkeypatch, capsys, tmp_path):
    """siftguide-train is the package's entry point (siftguide.train:main), with the configs inside the package:
    it runs from any directory, no checkout needed (the non-editable install: tests/test_install.py)."""
    import tomllib

    import siftguide.train
    from tests.conftest import ROOT

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["siftguide-train"] == "siftguide.train:main"
    monkeypatch.chdir(tmp_path)  # any directory
    monkeypatch.setattr("sys.argv", ["siftguide-train", "--cfg", "job", "trainer.max_steps=7", "compile=true"])
    siftguide.train.main()  # --cfg job: print the composed config, do not train
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "compile: true" in out and "callbacks:" in out


def test_root_train_py_is_a_wrapper_of_the_package_entry_point():
    from tests.conftest import ROOT

    code = [line for line in (ROOT / "train.py").read_text().splitlines() if line and not line.startswith('"""')]
    assert code == ["from siftguide.train import main", 'if __name__ == "__main__":', "    main()"]


@pytest.mark.slow
def test_compiled_run_matches_eager(tiny_cfg):
    """compile=true: the blocks run compiled (one-off compile of minutes on a small CPU) with the guidance capture
    inside them, and the losses of the first steps match the eager run's."""
    import pandas as pd

    losses = []
    for name, extra in (("eager", []), ("compiled", ["compile=true"])):
        cfg = tiny_cfg(["trainer.max_steps=2", "callbacks.knn=null", *extra], name=name)
        train(cfg)
        m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
        losses.append(m[["train/task_loss", "train/guidance_loss"]].dropna().to_numpy())
    assert losses[0].shape == (2, 2)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
