"""The analyze command end to end: a tiny checkpoint (the shared supervised run), a timm name with the random-init
fallback, user errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from siftguide.analysis.analyze import RANDOM_INIT, main
from tests.conftest import blob_image


def test_cli_on_a_checkpoint(supervised_run, tmp_path, capsys):
    out = tmp_path / "an"
    assert main([str(supervised_run.ckpt), "--out", str(out), "--num-images", "24", "--batch-size", "12", "--overlays", "2",
                 "--top", "2", "--no-progress", "--layer", "0", "--head", "1"]) == 0
    for f in ("metrics.csv", "metrics_layers.csv", "report.md", "heatmaps.png", "interrelation.png", "overlays.png",
              "spurious_images.csv", "spurious_classes.csv", "spurious_overlays.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 2 * 2 and list(m[["layer", "head"]].itertuples(index=False, name=None)) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    for col in ("recv_kp0", "recv_kp2plus", "cls_ratio_kp0", "rich_to_poor", "poor_to_rich", "kl", "spearman",
                "distance", "entropy"):
        assert col in m.columns and m[col].notna().all(), col
    assert (m["kl"] >= 0).all() and (m["spearman"].abs() <= 1).all()
    imgs, classes = pd.read_csv(out / "spurious_images.csv"), pd.read_csv(out / "spurious_classes.csv")
    assert len(imgs) == 24 and imgs["attn_poor_excess"].is_monotonic_decreasing
    assert classes["images"].sum() == 24 and "grad_poor_share" in imgs.columns
    report = (out / "report.md").read_text()
    assert "trained checkpoint" in report and "RANDOM INIT" not in report and "--num-images 24" in report
    assert "CLS attn, layer 0, head 1" in report and "## Spurious-correlation candidates" in report
    assert "mean [0.286] std [0.353]" in report  # the run's own normalisation
    # errors: a checkpoint's input size is fixed
    with pytest.raises(SystemExit) as e:
        main([str(supervised_run.ckpt), "--out", str(out), "--img-size", "40"])
    assert e.value.code == 2 and "image size mismatch" in capsys.readouterr().err


def test_cli_timm_name_falls_back_to_random_init(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no download attempt (and no retries) in tests
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))  # and no locally cached weights
    folder = tmp_path / "imgs"
    folder.mkdir()
    blob = (blob_image(40, center=(12.0, 20.0), sigma=3.0)[0, 0] * 255).byte().numpy()
    Image.fromarray(blob).save(folder / "grey.png")
    Image.fromarray(np.stack([blob, blob[::-1], blob.T], -1)).save(folder / "rgb.jpg")
    out = tmp_path / "an"
    args = ["vit_tiny_patch16_224", "--out", str(out), "--images", str(folder), "--no-progress", "--spurious",
            "--model-arg", "patch_size=8", "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
            "--model-arg", "num_heads=2", "--img-size", "32"]
    assert main(args) == 0
    assert RANDOM_INIT in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert RANDOM_INIT in report and "folder" in report and "input 32x32, 3 channel(s)" in report
    assert len(pd.read_csv(out / "metrics.csv")) == 4
    classes = pd.read_csv(out / "spurious_classes.csv")
    assert classes["images"].sum() == 2 and classes["accuracy"].isna().all()  # ImageNet classes: no accuracy
    assert "predicted class" in report


def test_cli_errors(tmp_path, usage_error):
    err = usage_error(main)
    out = ["--out", str(tmp_path / "o")]
    assert "checkpoint not found" in err([str(tmp_path / "missing.ckpt"), *out])
    assert "neither an existing checkpoint nor a timm model name" in err(["not_a_model_xyz", *out])
    (tmp_path / "empty").mkdir()
    tiny = ["--random-init", "--model-arg", "depth=1", "--model-arg", "embed_dim=16", "--model-arg", "num_heads=1",
            "--model-arg", "patch_size=8"]
    assert "no image files" in err(["vit_tiny_patch16_224", *out, *tiny, "--img-size", "32", "--images",
                                    str(tmp_path / "empty")])
    assert "does not divide the image size" in err(["vit_tiny_patch16_224", *out, *tiny, "--img-size", "30"])
    assert "--head 5 out of range" in err(["vit_tiny_patch16_224", *out, *tiny, "--img-size", "32", "--head", "5",
                                           "--images", str(tmp_path)])
