"""siftguide.analysis.prompt: accuracy bookkeeping by hand, the bias moving a real tiny ViT's attention onto the
keypoints (and beta 0 being the plain model), the command line on a tiny checkpoint, and its user errors."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from siftguide.analysis.images import dataset_source, image_batches
from siftguide.analysis.loading import load_checkpoint_model
from siftguide.analysis.prompt import class_rows, main, prompt_predictions, prompting_rows
from tests.conftest import blob_image


def test_prompting_rows_by_hand():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    preds = torch.tensor([[0, 1, 0, 1, 1, 2],    # beta 0: 4 / 6 right (images 0, 1, 4, 5)
                          [0, 1, 2, 0, 0, 2],    # beta 1: 5 / 6; fixes 2 and 3, breaks 4
                          [1, 1, 1, 1, 1, 1]])   # beta 2: 2 / 6; breaks 0 and 5
    share = torch.tensor([[0.5] * 6, [0.2] * 6, [float("nan")] + [0.1] * 5])
    rows = prompting_rows(preds, labels, [0, 1, 2], poor_share=share)
    assert [r["correct"] for r in rows] == [4, 5, 2]
    assert [r["accuracy"] for r in rows] == pytest.approx([4 / 6, 5 / 6, 2 / 6])
    assert [r["delta"] for r in rows] == pytest.approx([0, 1 / 6, -2 / 6])
    assert [(r["fixed"], r["broken"]) for r in rows] == [(0, 0), (2, 1), (0, 2)]
    assert [r["poor_share"] for r in rows] == pytest.approx([0.5, 0.2, 0.1])  # NaN skipped
    # the reference is the beta-0 row wherever it is
    assert prompting_rows(preds[[1, 0]], labels, [1, 0])[0]["delta"] == pytest.approx(1 / 6)
    cls = class_rows(preds, labels, [0, 1, 2], ["a", "b", "c"])
    assert [(r["name"], r["images"]) for r in cls] == [("a", 2), ("b", 2), ("c", 2)]
    assert [r["acc_beta1"] for r in cls] == [1.0, 0.5, 1.0] and cls[1]["acc_beta2"] == 1.0
    with pytest.raises(ValueError, match="preds must be"):
        prompting_rows(preds, labels, [0, 1])


def test_prompting_moves_attention_onto_keypoints_and_beta_zero_is_the_plain_model(tiny_vit):
    net = tiny_vit().eval()
    img = blob_image(32, center=(12.0, 12.0), sigma=2.0, batch=4)  # keypoints only in patch (1, 1)
    batch = {"image": img, "label": torch.tensor([0, 1, 2, 0])}
    res = prompt_predictions(net, [batch], mean=(0.5,), std=(0.5,), betas=[0, 2], layers=[-1])
    assert res["preds"].shape == (2, 4) and res["layers"] == [1] and res["measured_layer"] == 1
    # random init: near-uniform attention, ~15/16 on the 15 keypoint-free patches; the bias moves it to the blob
    assert (res["poor_share"][0] > 0.8).all() and (res["poor_share"][1] < 0.2).all(), res["poor_share"]
    assert (res["kl"][1] < res["kl"][0] - 1).all() and (res["spearman"][1] >= res["spearman"][0] - 1e-6).all()
    with torch.no_grad():
        plain = net((img - 0.5) / 0.5).argmax(-1)
    assert torch.equal(res["preds"][0], plain)  # beta 0: the model as trained
    # all blocks biased: still the blob
    res_all = prompt_predictions(net, [batch], mean=(0.5,), std=(0.5,), betas=[2], layers=[0, 1])
    assert (res_all["poor_share"][0] < 0.2).all()
    # the model is untouched afterwards
    with torch.no_grad():
        assert torch.equal(net((img - 0.5) / 0.5).argmax(-1), plain)


def test_cli_reports_accuracy_with_and_without_prompting(supervised_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert main([str(supervised_run.ckpt), "--out", str(out), "--beta", "2", "1", "--num-images", "24", "--batch-size", "10",
                 "--split", "val", "--layers", "all"]) == 0
    rows = pd.read_csv(out / "prompting.csv")
    assert rows["beta"].tolist() == [0, 1, 2] and (rows["images"] == 24).all() and rows["delta"].iloc[0] == 0
    assert (rows["layers"] == "0 1").all()
    # beta 0 is the checkpoint's plain accuracy on the same 24 validation images
    model = load_checkpoint_model(str(supervised_run.ckpt))
    src = dataset_source(model, [], "val")
    correct = 0
    mean, std = torch.tensor(model.mean).view(1, -1, 1, 1), torch.tensor(model.std).view(1, -1, 1, 1)
    for b in image_batches(src, list(range(24)), 24, model.in_chans, model.img_size):
        with torch.no_grad():
            correct += int((model.net.eval()((b["image"] - mean) / std).argmax(-1) == b["label"]).sum())
    assert rows["correct"].iloc[0] == correct
    assert rows["poor_share"].iloc[2] < rows["poor_share"].iloc[0]  # prompting pulls attention onto keypoints
    cls = pd.read_csv(out / "prompting_classes.csv")
    assert cls["images"].sum() == 24 and {"acc_beta0", "acc_beta1", "acc_beta2"} <= set(cls.columns)
    md = (out / "prompting.md").read_text()
    assert "Biased blocks: [0, 1]" in md and "| Trouser |" in md  # class names of Fashion-MNIST
    assert "beta 2: accuracy" in capsys.readouterr().out


def test_cli_errors(supervised_run, tmp_path, usage_error):
    err = usage_error(main)
    out = ["--out", str(tmp_path / "o")]
    assert "checkpoint not found" in err([str(tmp_path / "missing.ckpt"), *out])
    assert "image size mismatch" in err([str(supervised_run.ckpt), *out, "--img-size", "64"])  # the tiny model takes 32 px
    assert "out of range" in err([str(supervised_run.ckpt), *out, "--layers", "5"])
    assert "--beta values" in err([str(supervised_run.ckpt), *out, "--beta", "-1"])
    assert "data.KEY=VALUE" in err([str(supervised_run.ckpt), *out, "val_size=3"])
    assert not (tmp_path / "o").exists()  # no partial output on a user error
